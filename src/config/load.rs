//! Stage one: the file as written, read and parsed as TOML (syntax only), then handed to
//! stage two ([`super::resolve`]) with the file's directory as the base of relative paths.

use super::{resolve, Config, ConfigError, ConfigProblem};
use std::path::{Path, PathBuf};

/// Stage one: the file as written.
pub fn parse(text: &str, file: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| ConfigError {
        file: file.to_owned(),
        problems: vec![ConfigProblem {
            key: "(syntax)".into(),
            message: e.to_string().trim().replace('\n', " "),
        }],
    })
}

/// Reads and resolves a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        problems: vec![ConfigProblem {
            key: "(file)".into(),
            message: format!("cannot read: {e}"),
        }],
    })?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };
    resolve(&parse(&text, &file)?, &base, &file)
}
