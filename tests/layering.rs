//! The parts depend one way: `main` → any part; `demo` → `sidecar`, `config`; `operator` → `api`,
//! `config`, `report`; `sidecar` → `config`, `report`; `api` → `config`. What the operator and
//! the sidecar both speak lives in `config` and `report`. This test reads the sources and fails
//! when a module names a part it must not depend on.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::<part>` a file's non-test code names (in `use` lines, groups and paths alike),
/// with its line. Unit tests (after `#[cfg(test)]`) may set up what they need.
fn uses(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let code: String = text
        .lines()
        .take_while(|l| l.trim() != "#[cfg(test)]")
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(rel) = code[from..].find("crate::") {
        let at = from + rel + "crate::".len();
        from = at;
        if let Some(group) = code[at..].strip_prefix('{') {
            // `crate::{a, b::{c, d}}`: the top-level names of the group.
            let (mut depth, mut start) = (0, 0);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.push((line_of(at), ident(&group[start..i])));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push((line_of(at), ident(&group[start..i])));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.push((line_of(at), ident(&code[at..])));
        }
    }
    out.retain(|(_, p)| !p.is_empty());
    out
}

fn check(part: &str, allowed: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let dir = root.join(part);
    if dir.is_dir() {
        rust_files(&dir, &mut files);
    } else {
        files.push(root.join(format!("{part}.rs")));
    }
    let mut bad = Vec::new();
    for f in files {
        for (line, used) in uses(&f) {
            if used != part && !allowed.contains(&used.as_str()) {
                bad.push(format!("{}:{line}: {part} uses crate::{used}", f.display()));
            }
        }
    }
    bad
}

#[test]
fn parts_depend_one_way() {
    let mut bad = Vec::new();
    bad.extend(check("config", &[]));
    bad.extend(check("report", &[]));
    bad.extend(check("api", &["config"]));
    bad.extend(check("sidecar", &["config", "report"]));
    bad.extend(check("operator", &["api", "config", "report"]));
    bad.extend(check("demo", &["sidecar", "config"]));
    assert!(
        bad.is_empty(),
        "imports against the layering:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_checker_sees_a_crate_path() {
    let dir = std::env::temp_dir().join(format!("detour-layering-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("x.rs");
    std::fs::write(
        &f,
        "use crate::sidecar::X; // crate::operator in a comment\nlet y = crate::api::Y;\n",
    )
    .unwrap();
    let found: Vec<String> = uses(&f).into_iter().map(|(_, p)| p).collect();
    assert_eq!(found, ["sidecar", "api"]);
    let _ = std::fs::remove_dir_all(&dir);
}
