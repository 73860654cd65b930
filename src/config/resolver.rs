//! The [`Resolver`]: stage two's reader of single keys. Each reader takes the value as
//! written, or else the key's default from [`KEYS`], checks its type (and range), and
//! records a [`ConfigProblem`] under the key when it is wrong, so that every problem of a
//! file is found in one pass. The sections' own checks live with the sections.

use super::keys::{self, KEYS};
use super::ConfigProblem;
use std::path::{Path, PathBuf};

/// `p`, made absolute against `base` unless it already is.
pub(super) fn absolute(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

/// The file's table being resolved, and the problems found so far.
pub(super) struct Resolver<'a> {
    table: &'a toml::Table,
    pub(super) problems: Vec<ConfigProblem>,
}

impl<'a> Resolver<'a> {
    pub(super) fn new(table: &'a toml::Table) -> Resolver<'a> {
        Resolver {
            table,
            problems: Vec::new(),
        }
    }

    /// Records a problem with `key`; `None`, for the value that key does not have.
    pub(super) fn problem<T>(&mut self, key: &str, message: String) -> Option<T> {
        self.problems.push(ConfigProblem {
            key: key.to_owned(),
            message,
        });
        None
    }

    /// The value at `section.key`, if written.
    pub(super) fn raw(&mut self, key: &'static str) -> Option<&toml::Value> {
        debug_assert!(keys::row(key).is_some(), "undocumented key {key}");
        let (section, name) = key.split_once('.')?;
        self.table.get(section)?.as_table()?.get(name)
    }

    /// The value at `key` as written, else its default from its [`KEYS`] row. A key read
    /// this way always has a default there (the defaults test resolves every one); were
    /// one missing, the key would be reported rather than the process stopped.
    pub(super) fn value(&mut self, key: &'static str) -> Option<toml::Value> {
        if let Some(v) = self.raw(key) {
            return Some(v.clone());
        }
        let default = keys::row(key).and_then(keys::KeyDoc::default_value);
        debug_assert!(default.is_some(), "{key} has no default in KEYS");
        match default {
            Some(v) => Some(v),
            None => self.problem(key, "has no built-in default: give it a value".into()),
        }
    }

    pub(super) fn string(&mut self, key: &'static str) -> Option<String> {
        match self.value(key)? {
            toml::Value::String(s) => Some(s),
            v => self.problem(key, format!("expected a string, found {}", v.type_str())),
        }
    }

    pub(super) fn required_path(&mut self, key: &'static str, base: &Path) -> Option<PathBuf> {
        match self.raw(key).cloned() {
            None => self.problem(key, "is required".into()),
            Some(toml::Value::String(s)) if !s.is_empty() => Some(absolute(base, &s)),
            Some(v) => self.problem(key, format!("expected a file path, found {v}")),
        }
    }

    pub(super) fn bool(&mut self, key: &'static str) -> Option<bool> {
        match self.value(key)? {
            toml::Value::Boolean(b) => Some(b),
            v => self.problem(key, format!("expected true or false, found {v}")),
        }
    }

    pub(super) fn int(&mut self, key: &'static str, min: i64, max: i64) -> Option<i64> {
        match self.value(key)? {
            toml::Value::Integer(n) if (min..=max).contains(&n) => Some(n),
            toml::Value::Integer(n) => self.problem(key, format!("{n} is outside {min}..={max}")),
            v => self.problem(key, format!("expected an integer, found {}", v.type_str())),
        }
    }

    pub(super) fn string_list(&mut self, key: &'static str) -> Option<Vec<String>> {
        match self.value(key)? {
            toml::Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        toml::Value::String(s) => out.push(s),
                        other => {
                            return self.problem(
                                key,
                                format!("expected strings, found {}", other.type_str()),
                            )
                        }
                    }
                }
                Some(out)
            }
            v => self.problem(
                key,
                format!("expected a list of strings, found {}", v.type_str()),
            ),
        }
    }

    /// Every key written that is not in [`KEYS`], with the key of the same name in another
    /// section as a hint.
    pub(super) fn unknown_keys(&mut self) {
        let mut unknown = Vec::new();
        for (section, value) in self.table {
            match value.as_table() {
                Some(t) => {
                    for name in t.keys() {
                        let full = format!("{section}.{name}");
                        if !KEYS.iter().any(|k| k.key == full) {
                            unknown.push(full);
                        }
                    }
                }
                None => unknown.push(section.clone()),
            }
        }
        for key in unknown {
            let hint = KEYS
                .iter()
                .find(|k| k.key.rsplit('.').next() == key.rsplit('.').next())
                .map(|k| format!(" (did you mean {}?)", k.key))
                .unwrap_or_default();
            self.problem::<()>(&key, format!("unknown key{hint}"));
        }
    }
}
