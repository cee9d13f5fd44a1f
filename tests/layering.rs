//! The parts depend one way: `main` → any part; `demo` → `sidecar`, `config`; `operator` → `api`,
//! `config`, `report`, `admin_server`; `sidecar` → `config`, `report`, `admin_server`; `api` →
//! `config`. What the operator and the sidecar both speak lives in `config` and `report`; the
//! admin server's accept loop both run is `admin_server`, which depends on no part. This test
//! reads the sources and fails when a module names a part it must not depend on.
//!
//! Inside the sidecar, the modules sit in layers (`SIDECAR_LAYERS`) and depend one way too: a
//! module imports modules of lower layers, or of its own layer without a cycle, never one above.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

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

/// A file's non-test code without comments: unit tests (after `#[cfg(test)]`) may set up what
/// they need.
fn code_of(path: &Path) -> String {
    code(&std::fs::read_to_string(path).unwrap())
}

fn code(text: &str) -> String {
    text.lines()
        .take_while(|l| l.trim() != "#[cfg(test)]")
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first name after each `prefix` in `code` (in `use` lines, groups and paths alike), with
/// its line: `prefix{a, b::{c, d}}` names `a` and `b`.
fn names_after(code: &str, prefix: &str) -> Vec<(usize, String)> {
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(rel) = code[from..].find(prefix) {
        let at = from + rel + prefix.len();
        from = at;
        // `xsuper::` or `my_crate::` are other paths.
        let before = code[..at - prefix.len()].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = code[at..].strip_prefix('{') {
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

/// Every `crate::<part>` a file's non-test code names, with its line.
fn uses(path: &Path) -> Vec<(usize, String)> {
    names_after(&code_of(path), "crate::")
}

/// Every module of the sidecar a file of it names (`super::m`, `crate::sidecar::m`), with its
/// line.
fn sidecar_uses(code: &str) -> Vec<(usize, String)> {
    let mut out = names_after(code, "super::");
    out.extend(names_after(code, "crate::sidecar::"));
    out.sort();
    out
}

fn check(part: &str, allowed: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let dir = root.join(part);
    let file = root.join(format!("{part}.rs"));
    if dir.is_dir() {
        rust_files(&dir, &mut files);
    } else if file.is_file() {
        files.push(file);
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
    bad.extend(check("admin_server", &[]));
    bad.extend(check("api", &["config"]));
    bad.extend(check("sidecar", &["config", "report", "admin_server"]));
    bad.extend(check(
        "operator",
        &["api", "config", "report", "admin_server"],
    ));
    bad.extend(check("demo", &["sidecar", "config"]));
    assert!(
        bad.is_empty(),
        "imports against the layering:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_checker_sees_a_crate_path() {
    let text = "use crate::sidecar::X; // crate::operator in a comment\nlet y = crate::api::Y;\n";
    let found: Vec<String> = names_after(&code(text), "crate::")
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(found, ["sidecar", "api"]);
}

/// The sidecar's modules, lowest layer first. A module may import modules of lower layers, and
/// of its own layer when that makes no cycle; never one above. `mod.rs` is the sidecar's front
/// (`run`, its `Args` and `Error`): not a layer; modules may use its own items (`FRONT_ITEMS`).
const SIDECAR_LAYERS: &[(&str, &[&str])] = &[
    // The HTTP/1.1 client codec: imports nothing of the sidecar.
    ("codec", &["h1"]),
    // Small helpers: header rules, the retry budget, the pod's labels, the worker threads.
    ("helpers", &["headers", "budget", "labels", "workers"]),
    // An endpoint and its per-worker connection pools.
    ("connections", &["pool", "endpoint"]),
    // What the client gets and how failures are named and counted.
    ("responses", &["body", "errors", "metrics"]),
    // One upstream: its endpoints, balancing over them, checking them.
    ("upstream", &["upstream", "balancer", "health_check"]),
    // One request end to end: attempts, retries, the answer.
    ("request", &["proxy"]),
    // The running sidecar: listeners and reloads (`runtime`), the admin server reading its
    // state, where configs come from (`source`).
    ("listener", &["runtime", "admin", "source"]),
    // The sidecar as a program embeds it: starts the parts above and wires them together.
    ("front", &["handle"]),
];

/// Items of `mod.rs` that modules may use.
const FRONT_ITEMS: &[&str] = &["Error"];

/// Which module of the sidecar imports which, from the sources.
fn sidecar_imports() -> BTreeMap<String, Vec<(usize, String)>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/sidecar");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    files
        .iter()
        .filter(|f| f.file_name().is_some_and(|n| n != "mod.rs"))
        .map(|f| {
            let name = f.file_stem().unwrap().to_string_lossy().into_owned();
            (name, sidecar_uses(&code_of(f)))
        })
        .collect()
}

/// What breaks the layering in `imports`, one line each: a module with no layer, a name that is
/// no module, an import of a higher layer, a cycle within a layer.
fn layering_violations(
    layers: &[(&str, &[&str])],
    imports: &BTreeMap<String, Vec<(usize, String)>>,
) -> Vec<String> {
    let layer_of = |m: &str| layers.iter().position(|(_, ms)| ms.contains(&m));
    let mut bad = Vec::new();
    // Imports within one layer, to look for cycles.
    let mut same: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (module, used) in imports {
        let Some(own) = layer_of(module) else {
            bad.push(format!("{module}: in no layer of SIDECAR_LAYERS"));
            continue;
        };
        for (line, name) in used {
            if name == module || FRONT_ITEMS.contains(&name.as_str()) {
                continue;
            }
            match layer_of(name) {
                None => bad.push(format!("{module}:{line}: uses super::{name}, no module")),
                Some(l) if l > own => bad.push(format!(
                    "{module}:{line}: uses {name}, of the higher layer {}",
                    layers[l].0
                )),
                Some(l) if l == own => {
                    same.entry(module).or_default().insert(name);
                }
                Some(_) => {}
            }
        }
    }
    if let Some(cycle) = find_cycle(&same) {
        bad.push(format!("a cycle within a layer: {}", cycle.join(" → ")));
    }
    bad
}

/// A cycle in `edges`, as the modules along it (first one repeated at the end).
fn find_cycle<'a>(edges: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Option<Vec<&'a str>> {
    fn visit<'a>(
        at: &'a str,
        edges: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if let Some(i) = path.iter().position(|m| *m == at) {
            let mut cycle = path[i..].to_vec();
            cycle.push(at);
            return Some(cycle);
        }
        if !done.insert(at) {
            return None;
        }
        path.push(at);
        for next in edges.get(at).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|m| visit(m, edges, &mut Vec::new(), &mut done))
}

#[test]
fn the_sidecars_modules_depend_one_way() {
    let imports = sidecar_imports();
    let mut bad = layering_violations(SIDECAR_LAYERS, &imports);
    for (_, modules) in SIDECAR_LAYERS {
        for m in *modules {
            if !imports.contains_key(*m) {
                bad.push(format!(
                    "{m}: in SIDECAR_LAYERS, but src/sidecar/{m}.rs is gone"
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "imports against the sidecar's layers:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_layer_checker_sees_sidecar_paths_and_refuses_what_it_must() {
    let text = "use super::{pool::X, h1};\nlet y = super::endpoint::f(); // super::proxy in a comment\n\
                use crate::sidecar::metrics::M;\nlet z = mysuper::no;\n#[cfg(test)]\nuse super::demo;\n";
    let found: Vec<String> = sidecar_uses(&code(text))
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    assert_eq!(found, ["h1", "pool", "endpoint", "metrics"]);

    let layers: &[(&str, &[&str])] = &[("low", &["a", "b"]), ("high", &["c"])];
    let graph = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, Vec<(usize, String)>> =
            ["a", "b", "c"].map(|m| (m.to_string(), Vec::new())).into();
        for (from, to) in edges {
            g.get_mut(*from).unwrap().push((1, to.to_string()));
        }
        g
    };
    let ok = graph(&[("c", "a"), ("c", "b"), ("a", "b"), ("a", "Error")]);
    assert_eq!(layering_violations(layers, &ok), Vec::<String>::new());
    let up = layering_violations(layers, &graph(&[("a", "c")]));
    assert_eq!(up, ["a:1: uses c, of the higher layer high"]);
    let cycle = layering_violations(layers, &graph(&[("a", "b"), ("b", "a")]));
    assert_eq!(cycle, ["a cycle within a layer: a → b → a"]);
    let mut unknown = graph(&[("a", "nothing")]);
    unknown.insert("d".into(), Vec::new());
    assert_eq!(
        layering_violations(layers, &unknown),
        [
            "a:1: uses super::nothing, no module",
            "d: in no layer of SIDECAR_LAYERS"
        ]
    );
}
