//! The agent's layout holds: every room (top-level module of `agent/src`) has a place
//! in the layer order below, no room uses a room above it or beside it (so there is no
//! import circle), and no source file of the agent, the gateway or the cluster crate
//! grows past 600 lines outside its tests.
//!
//! `cargo test -p fogline-tests --test layout -- --nocapture` prints the map: each room,
//! its layer, what it uses, and the largest files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The agent's rooms, lowest first. A room may use rooms of lower layers only. The
/// foundations (layer 0) use nothing of the crate; `lib.rs` wires everything.
const LAYERS: &[(&str, u32)] = &[
    ("addr", 0),
    ("batch", 0),
    ("fsync", 0),
    ("labels", 0),
    ("shutdown", 0),
    ("ingest", 1),
    ("aggregate", 2),
    ("buffer", 3),
    ("security", 4),
    ("router", 5),
    ("mqtt", 6),
    ("shipping", 7),
    ("uplink", 8),
    ("writer", 9),
    ("site", 10),
    ("ops", 11),
];

/// Items of the crate root that every room may use.
const ROOT_ITEMS: &[&str] = &["now_ms"];

const MAX_LINES: usize = 600;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        for e in entries {
            let path = e.expect("directory entry").path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// A file's code outside its tests: a file that is a test module (`tests.rs`, or under a
/// `tests/` directory) has none; otherwise everything before `#[cfg(test)]` opens the
/// file's `mod tests`.
fn code(path: &Path, text: &str) -> String {
    let test_file = path.file_name().is_some_and(|n| n == "tests.rs")
        || path.components().any(|c| c.as_os_str() == "tests");
    if test_file {
        return String::new();
    }
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.contains("mod tests") && !next.trim_end().ends_with(';'))
        {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The crate's rooms a piece of code uses: every `crate::<name>`, in code and in
/// `use crate::{a, b}` lists (doc comments left out).
fn uses(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let names: Vec<&str> = if let Some(list) = rest.strip_prefix('{') {
                let end = list.find('}').unwrap_or(list.len());
                list[..end]
                    .split(',')
                    .map(|n| n.trim().split("::").next().unwrap_or(""))
                    .collect()
            } else {
                vec![rest
                    .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or("")]
            };
            for n in names {
                if !n.is_empty() {
                    out.insert(n.to_owned());
                }
            }
        }
    }
    out
}

/// The room of a file under `agent/src`, `None` for the crate root (`lib.rs`, `main.rs`).
fn room_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next()?.as_os_str().to_string_lossy();
    let name = first.trim_end_matches(".rs").to_owned();
    (name != "lib" && name != "main").then_some(name)
}

#[test]
fn rooms_use_only_the_layers_below_them() {
    let src = workspace().join("agent/src");
    let layer: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
    let mut problems = Vec::new();
    for line in lib.lines() {
        if let Some(name) = line.strip_prefix("pub mod ").or(line.strip_prefix("mod ")) {
            let name = name.trim_end_matches(';');
            if !layer.contains_key(name) {
                problems.push(format!(
                    "agent/src/{name}: a room without a layer; add it to LAYERS in this test"
                ));
            }
        }
    }
    let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in sources(&src) {
        let Some(room) = room_of(&src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("source");
        let Some(&own) = layer.get(room.as_str()) else {
            continue;
        };
        for used in uses(&code(&file, &text)) {
            if used == room || ROOT_ITEMS.contains(&used.as_str()) {
                continue;
            }
            map.entry(room.clone()).or_default().insert(used.clone());
            match layer.get(used.as_str()) {
                Some(&l) if l < own => {}
                Some(&l) => problems.push(format!(
                    "{} (room {room}, layer {own}) uses crate::{used} (layer {l}): a room \
                     may use only the layers below it",
                    file.strip_prefix(workspace()).unwrap_or(&file).display()
                )),
                None => problems.push(format!(
                    "{} uses crate::{used}, which is not a room of the agent",
                    file.strip_prefix(workspace()).unwrap_or(&file).display()
                )),
            }
        }
    }
    println!("layer  room       uses");
    for (name, l) in LAYERS {
        let used: Vec<&str> = map
            .get(*name)
            .map(|s| s.iter().map(String::as_str).collect())
            .unwrap_or_default();
        println!("{l:>5}  {name:<10} {}", used.join(", "));
    }
    assert!(problems.is_empty(), "layout:\n{}", problems.join("\n"));
}

#[test]
fn no_source_file_is_over_600_lines_outside_its_tests() {
    let root = workspace();
    let mut sizes = Vec::new();
    for dir in ["agent/src", "agent/cluster/src", "gateway/src"] {
        for file in sources(&root.join(dir)) {
            let text = std::fs::read_to_string(&file).expect("source");
            let n = code(&file, &text).lines().count();
            sizes.push((n, file.strip_prefix(&root).unwrap_or(&file).to_path_buf()));
        }
    }
    sizes.sort_by(|a, b| b.cmp(a));
    println!("largest files (lines outside tests):");
    for (n, f) in sizes.iter().take(12) {
        println!("{n:>6}  {}", f.display());
    }
    assert!(sizes.len() > 50, "found only {} source files", sizes.len());
    let over: Vec<String> = sizes
        .iter()
        .filter(|(n, _)| *n > MAX_LINES)
        .map(|(n, f)| format!("{}: {n} lines", f.display()))
        .collect();
    assert!(
        over.is_empty(),
        "over {MAX_LINES} lines outside tests (split by concept):\n{}",
        over.join("\n")
    );
}

#[test]
fn the_checks_see_what_they_check() {
    // The scanner itself: uses are found in paths and in use lists, not in comments;
    // test modules are left out.
    let code_text = "use crate::buffer::Log;\nuse crate::{mqtt::X, ops};\n// crate::site\nlet x = crate::uplink::f();\n#[cfg(test)]\nmod tests {\n    use crate::writer;\n}\n";
    let found = uses(&code(Path::new("agent/src/a.rs"), code_text));
    let want: BTreeSet<String> = ["buffer", "mqtt", "ops", "uplink"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    assert_eq!(found, want);
    assert!(code(Path::new("agent/src/buffer/tests.rs"), code_text).is_empty());
}
