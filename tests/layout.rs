//! The shape of the code, checked: no import cycle between the library's modules.
//!
//! A module here is a file under `src/` (`src/bin` excluded); it depends on another when it
//! names it through `crate::…` or `super::…` outside its `#[cfg(test)] mod tests`. A cycle
//! (two modules that need each other, however far round) fails the test with the modules
//! and the edges that close it. A module's reference to its own parent counts as an edge,
//! the `mod` line that declares a child does not.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every module of the library: its path (`store::postgres`) and its file.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path != src.join("bin") {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            if parts == ["lib"] {
                continue;
            }
            out.insert(parts.join("::"), path);
        }
    }
    out
}

/// The text of a file without its unit tests and its comments.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(at) => &l[..at],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths a file names after `prefix` (`crate::` or `super::`), with `use` groups
/// (`crate::{a, b::{c, d}}`) expanded into one path each.
fn named_paths(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        expand("", rest, &mut out);
    }
    out
}

/// Expands the path (or use tree) at the start of `text` after `prefix`.
fn expand(prefix: &str, text: &str, out: &mut Vec<String>) {
    let ident_len = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(text.len());
    let head = &text[..ident_len];
    let after = &text[ident_len..];
    if (head.is_empty() || head.ends_with("::")) && after.starts_with('{') {
        let body = &after[1..];
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    expand(&format!("{prefix}{head}"), body[start..i].trim(), out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&format!("{prefix}{head}"), body[start..i].trim(), out);
                    start = i + 1;
                }
                _ => {}
            }
        }
    } else {
        out.push(format!("{prefix}{}", head.trim_end_matches(':')));
    }
}

/// The longest module that `path` starts with.
fn module_of(path: &str, known: &BTreeMap<String, PathBuf>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find(|candidate| known.contains_key(candidate))
}

fn dependencies(known: &BTreeMap<String, PathBuf>) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges = BTreeMap::new();
    for (name, file) in known {
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let parent: Vec<&str> = name.split("::").collect();
        let parent = parent[..parent.len() - 1].join("::");
        let mut deps = BTreeSet::new();
        for path in named_paths(&code, "crate::") {
            deps.extend(module_of(&path, known));
        }
        for path in named_paths(&code, "super::") {
            let full = if parent.is_empty() {
                path
            } else {
                format!("{parent}::{path}")
            };
            deps.extend(module_of(&full, known).or_else(|| {
                // `super::Item` names the parent module itself.
                known.contains_key(&parent).then(|| parent.clone())
            }));
        }
        deps.remove(name);
        edges.insert(name.clone(), deps);
    }
    edges
}

/// The strongly connected components with more than one module (Tarjan).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        let edges = s.edges;
        for w in edges.get(v).into_iter().flatten() {
            if !s.index.contains_key(w.as_str()) {
                visit(s, w);
                let low = s.low[v].min(s.low[w.as_str()]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w.as_str()) {
                let low = s.low[v].min(s.index[w.as_str()]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let known = modules(&src);
    assert!(known.contains_key("wire") && known.contains_key("store::postgres"));
    let edges = dependencies(&known);
    // The checker sees what it should: a few edges every build has.
    assert!(edges["net"].contains("wire"), "{:?}", edges["net"]);
    assert!(
        edges["store::postgres"].contains("store"),
        "{:?}",
        edges["store::postgres"]
    );
    let found = cycles(&edges);
    let report: Vec<String> = found
        .iter()
        .map(|c| {
            let inside: BTreeSet<&String> = c.iter().collect();
            let lines: Vec<String> = c
                .iter()
                .map(|m| {
                    let to: Vec<&String> = edges[m].iter().filter(|d| inside.contains(d)).collect();
                    format!("    {m} -> {to:?}")
                })
                .collect();
            format!("a cycle of {} modules:\n{}", c.len(), lines.join("\n"))
        })
        .collect();
    assert!(found.is_empty(), "{}", report.join("\n"));
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let edge = |edges: &mut BTreeMap<String, BTreeSet<String>>, a: &str, b: &str| {
        edges.entry(a.into()).or_default().insert(b.into());
        edges.entry(b.into()).or_default();
    };
    edge(&mut edges, "a", "b");
    edge(&mut edges, "b", "c");
    edge(&mut edges, "c", "a");
    edge(&mut edges, "c", "d");
    assert_eq!(cycles(&edges), vec![vec!["a", "b", "c"]]);
    edges.get_mut("c").unwrap().remove("a");
    assert!(cycles(&edges).is_empty());
}

#[test]
fn use_groups_expand_to_each_path() {
    let mut out = named_paths(
        "use crate::{wire::{Status, Opcode}, store::postgres};\nlet x = crate::kdf::derive(1);",
        "crate::",
    );
    out.sort();
    assert_eq!(
        out,
        [
            "kdf::derive",
            "store::postgres",
            "wire::Opcode",
            "wire::Status"
        ]
    );
}
