//! The container image `image/build.sh` makes (the Dockerfile's twin): built from the release
//! binary, unpacked, and run inside its own root filesystem with chroot, so a library the
//! binary needs and the image lacks fails here, not in a cluster. Needs root (chroot) and
//! umoci: without them the test fails when `CI=true` (`.ci/test` installs umoci; CI runs as
//! root) and skips with a notice otherwise. It builds the release binary only when
//! target/release/detour does not exist yet (one release build for the whole suite).
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// The image's uncompressed size limit (docs/image.md reports the figure).
const MAX_ROOTFS_BYTES: u64 = 30 * 1024 * 1024;
const UID: u64 = 65532;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_relative() { repo().join(p) } else { p })
        .unwrap_or_else(|| repo().join("target"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Root (for chroot) and umoci are here; otherwise a notice, or a failure under `CI=true`.
fn can_build_and_chroot() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    let umoci = Command::new("umoci")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if root && umoci {
        return true;
    }
    let msg = format!(
        "the image test needs root (chroot) and umoci (apt-get install umoci; `bash .ci/test` \
         installs it): root={root} umoci={umoci}"
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED image_builds_and_runs_in_its_own_root_filesystem: {msg}");
    false
}

fn release_binary() -> PathBuf {
    let bin = target_dir().join("release/detour");
    if !bin.exists() {
        run(Command::new(env!("CARGO"))
            .args(["build", "--release", "--locked", "--bin", "detour"])
            .current_dir(repo()));
    }
    bin
}

/// Every regular file's size under `dir` (symlinks not followed): the uncompressed image.
fn tree_size(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                tree_size(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

fn file_names(dir: &Path, out: &mut Vec<String>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        out.push(e.file_name().to_string_lossy().into_owned());
        if e.file_type().unwrap().is_dir() {
            file_names(&e.path(), out);
        }
    }
}

/// `detour ARGS` as uid 65532 inside the image's root filesystem.
fn in_image(rootfs: &Path, args: &[&str]) -> Output {
    Command::new("chroot")
        .arg(format!("--userspec={UID}:{UID}"))
        .arg(rootfs)
        .arg("/usr/local/bin/detour")
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("chroot")
}

#[test]
fn image_builds_and_runs_in_its_own_root_filesystem() {
    if !can_build_and_chroot() {
        return;
    }
    let binary = release_binary();
    let work = target_dir().join("image-test");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    let built = run(Command::new("bash")
        .arg(repo().join("image/build.sh"))
        .arg("--binary")
        .arg(&binary)
        .arg("--out")
        .arg(&work)
        .arg("--tag")
        .arg("test"));
    let image = String::from_utf8_lossy(&built.stdout);
    assert!(image.trim_end().ends_with("/oci:test"), "{image}");

    let bundle = work.join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:test", work.join("oci").display()))
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");

    // The runtime config umoci derives from the image config: non-root, entrypoint detour.
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["process"]["user"]["uid"], UID, "{config:#}");
    assert_eq!(config["process"]["user"]["gid"], UID, "{config:#}");
    assert_eq!(
        config["process"]["args"],
        serde_json::json!(["/usr/local/bin/detour"]),
        "{config:#}"
    );

    // No shell, no package manager: nothing but the binary, its libraries and /etc entries.
    let mut names = Vec::new();
    file_names(&rootfs, &mut names);
    assert!(!rootfs.join("bin/sh").exists(), "{names:?}");
    for unwanted in ["sh", "bash", "dash", "busybox", "apt", "apt-get", "dpkg"] {
        assert!(
            !names.iter().any(|n| n == unwanted),
            "{unwanted} in {names:?}"
        );
    }
    let size = tree_size(&rootfs);
    eprintln!("image root filesystem: {size} bytes");
    assert!(size < MAX_ROOTFS_BYTES, "{size} bytes");
    assert!(size > fs::metadata(&binary).unwrap().len(), "{size} bytes");

    // It runs inside: a missing library or loader fails here.
    let version = in_image(&rootfs, &["--version"]);
    assert!(version.status.success(), "{version:?}");
    let want = format!("detour {}\n", env!("CARGO_PKG_VERSION"));
    assert_eq!(String::from_utf8_lossy(&version.stdout), want);

    fs::copy(
        repo().join("examples/sidecar.yaml"),
        rootfs.join("tmp/sidecar.yaml"),
    )
    .unwrap();
    let check = in_image(&rootfs, &["check", "--config", "/tmp/sidecar.yaml"]);
    assert!(check.status.success(), "{check:?}");
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(stdout.starts_with("/tmp/sidecar.yaml: ok ("), "{stdout}");

    let _ = fs::remove_dir_all(&work);
}
