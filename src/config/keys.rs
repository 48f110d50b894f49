//! The configuration file's keys, each declared once: its table, name,
//! type (a `Kind`, in `kinds.rs`), default, a line of documentation and,
//! in a table that configures a component, what it sets there, in a
//! `config_keys!` block. From that one declaration come the table
//! struct's field, its reading from TOML (type and range checked, every
//! problem collected), the unknown-key check with its list of known keys,
//! `apply` over the component's defaults, the declared defaults as values
//! (`defaults()`, `declared_str`, `flag_help`) and [`all`], which the
//! README test holds against the README's example. What ties keys together
//! (an address, a key that needs another, a file that must exist) is
//! checked after reading, by the table's own module.

pub(crate) use super::kinds::{
    count, secs, size, Choice, Choices, Int, Ips, Kind, List, Parsed, Startups, Str, Table,
    TlsModes,
};

/// One key of the configuration file.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// The table (`""` for the top level, `"http"` for `[http]`).
    pub table: &'static str,
    pub name: &'static str,
    /// Its type as people read it (`string`, `integer 1..=86400`, ...).
    pub kind: fn() -> String,
    /// Its default, as a TOML value or in words.
    pub default: &'static str,
    /// One line of documentation.
    pub doc: &'static str,
    /// A valid value of its type.
    #[cfg(test)]
    pub sample: fn() -> toml::Value,
}

impl Key {
    /// `table.name`, or `name` at the top level.
    pub fn qualified(&self) -> String {
        qualified(self.table, self.name)
    }
}

pub(crate) fn qualified(table: &str, name: &str) -> String {
    if table.is_empty() {
        name.to_string()
    } else {
        format!("{table}.{name}")
    }
}

/// A declared default read as a TOML value, if it is one.
pub(crate) fn parse_default(text: &str) -> Option<toml::Value> {
    let t: toml::Table = format!("v = {text}").parse().ok()?;
    t.get("v").cloned()
}

/// The declared default of the key `name` of `keys`, a TOML string,
/// without its quotes: for the constants other modules use
/// (`DEFAULT_STATE_DIR`). A name not declared, or a default that is not a
/// plain string, stops the build.
pub(crate) const fn declared_str(keys: &'static [Key], name: &str) -> &'static str {
    let mut i = 0;
    while i < keys.len() {
        let k = &keys[i];
        if k.name.len() == name.len() {
            let (a, b) = (k.name.as_bytes(), name.as_bytes());
            let mut j = 0;
            while j < a.len() && a[j] == b[j] {
                j += 1;
            }
            if j == a.len() {
                return match k.default.as_bytes() {
                    [b'"', inner @ .., b'"'] => match std::str::from_utf8(inner) {
                        Ok(s) => s,
                        Err(_) => panic!("declared default is not UTF-8"),
                    },
                    _ => panic!("declared default is not a TOML string"),
                };
            }
        }
        i += 1;
    }
    panic!("no such key declared")
}

/// Help text of a `serve` flag that stands for the top-level key `name`:
/// `text` and the key's declared default (a list as `a and b`).
pub(crate) fn flag_help(text: &str, name: &str) -> String {
    let declared = super::RawFile::KEYS
        .iter()
        .find(|k| k.name == name)
        .map_or("", |k| k.default);
    let shown = match parse_default(declared) {
        Some(toml::Value::String(s)) => s,
        Some(toml::Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(" and "),
        Some(other) => other.to_string(),
        None => declared.to_string(),
    };
    format!("{text} [default: {shown}]")
}

/// Reports the keys of `t` that `known` does not declare. At the top
/// level (`path` given) the message names the file.
pub(crate) fn check_unknown(
    t: &toml::Table,
    table: &str,
    known: &[Key],
    path: Option<&std::path::Path>,
    errs: &mut Vec<String>,
) {
    for key in t.keys() {
        if known.iter().any(|k| k.name == key) {
            continue;
        }
        let names: Vec<&str> = known.iter().map(|k| k.name).collect();
        let place = path
            .map(|p| format!(" in {}", p.display()))
            .unwrap_or_default();
        errs.push(format!(
            "unknown key `{}`{place} (known: {})",
            qualified(table, key),
            names.join(", ")
        ));
    }
}

/// The sub-table `name` of `t`, if there is one; anything else there is
/// reported.
pub(crate) fn sub_table<'a>(
    t: &'a toml::Table,
    name: &str,
    errs: &mut Vec<String>,
) -> Option<&'a toml::Table> {
    let value = t.get(name)?;
    match value.as_table() {
        Some(t) => Some(t),
        None => {
            errs.push(format!(
                "`{name}` must be a table, not {}",
                value.type_str()
            ));
            None
        }
    }
}

/// Declares the keys of one table of the configuration file:
///
/// ```text
/// config_keys! {
///     /// doc of the table's struct
///     pub struct HttpSettings in "http" for httpgate::HttpConfig {
///         /// Seconds before an idle client connection is closed.
///         idle_timeout_secs: Int<1, 86_400> = "120"
///             => |c, v| c.timeouts.idle = secs(v),
///     }
/// }
/// ```
///
/// makes `HttpSettings` (one `Option` per key, `None` when not given),
/// `HttpSettings::KEYS`, `HttpSettings::read(&toml::Table, &mut errs)`,
/// which reports unknown keys and wrong types and ranges, and
/// `HttpSettings::from_parent`, which reads the table `http` of the file.
/// With `for Target`, every key also says what it sets in the component's
/// configuration (`|c: &mut Target, v: Value|`), and the block makes
/// `apply(&self, &mut Target)`, which sets the keys given and leaves the
/// others at `Target`'s defaults. Without it (the top level), the block
/// makes `defaults()`, each key's declared default read as TOML.
macro_rules! config_keys {
    (
        $(#[$meta:meta])*
        $vis:vis struct $raw:ident in $table:literal for $target:ty {
            $( $(#[doc = $doc:literal])+
               $key:ident : $kind:ty = $default:literal => $apply:expr, )*
        }
    ) => {
        $crate::config::keys::config_keys! {
            $(#[$meta])*
            $vis struct $raw in $table {
                $( $(#[doc = $doc])+ $key : $kind = $default, )*
            }
        }

        impl $raw {
            /// Sets the keys given over `cfg` (the component's defaults);
            /// the others keep their value.
            pub fn apply(&self, cfg: &mut $target) {
                $( if let Some(v) = self.$key.clone() {
                    let set: fn(&mut $target, <$kind as $crate::config::keys::Kind>::Value) =
                        $apply;
                    set(cfg, v);
                } )*
            }

            /// Reads the table `$table` of the file's top level `parent`,
            /// if it has one.
            pub(crate) fn from_parent(parent: &toml::Table, errs: &mut Vec<String>) -> Self {
                match $crate::config::keys::sub_table(parent, $table, errs) {
                    Some(t) => Self::read(t, errs),
                    None => Self::default(),
                }
            }
        }
    };
    (
        $(#[$meta:meta])*
        $vis:vis struct $raw:ident in $table:literal {
            $( $(#[doc = $doc:literal])+ $key:ident : $kind:ty = $default:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default)]
        $vis struct $raw {
            $( $(#[doc = $doc])+
               pub(crate) $key: Option<<$kind as $crate::config::keys::Kind>::Value>, )*
        }

        impl $raw {
            /// Every key of this table, in the order they are documented.
            pub const KEYS: &'static [$crate::config::keys::Key] = &[
                $( $crate::config::keys::Key {
                    table: $table,
                    name: stringify!($key),
                    kind: <$kind as $crate::config::keys::Kind>::describe,
                    default: $default,
                    doc: concat!($($doc),+).trim_ascii(),
                    #[cfg(test)]
                    sample: <$kind as $crate::config::keys::Kind>::sample,
                }, )*
            ];

            /// Reads this table's keys from `t`; problems go to `errs`.
            #[allow(dead_code)]
            pub fn read(t: &toml::Table, errs: &mut Vec<String>) -> Self {
                $crate::config::keys::check_unknown(t, $table, Self::KEYS, None, errs);
                Self::read_known(t, errs)
            }

            /// Reads this table's keys from `t`, without the unknown-key check.
            pub fn read_known(t: &toml::Table, errs: &mut Vec<String>) -> Self {
                Self {
                    $( $key: t.get(stringify!($key)).and_then(|v| {
                        <$kind as $crate::config::keys::Kind>::take(
                            v,
                            &$crate::config::keys::qualified($table, stringify!($key)),
                            errs,
                        )
                    }), )*
                }
            }

            /// Each key's declared default, where that is a TOML value of
            /// the key's type (`None` where it is words, like "none").
            #[allow(dead_code)]
            pub fn defaults() -> Self {
                let mut errs = Vec::new();
                Self {
                    $( $key: $crate::config::keys::parse_default($default).and_then(|v| {
                        <$kind as $crate::config::keys::Kind>::take(&v, "", &mut errs)
                    }), )*
                }
            }

            /// Each key of `self`, or of `other` where `self` has none.
            #[allow(dead_code)]
            pub fn or(self, other: Self) -> Self {
                Self {
                    $( $key: self.$key.or(other.$key), )*
                }
            }
        }
    };
}

pub(crate) use config_keys;

/// Every key of the configuration file, every table.
pub fn all() -> Vec<Key> {
    [
        super::RawFile::KEYS,
        super::provision::RawProvision::KEYS,
        super::http::HttpSettings::KEYS,
        super::ssh::SshSettings::KEYS,
    ]
    .concat()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The keys of the README's configuration example, as `table.key`.
    fn readme_keys() -> Vec<String> {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("## Configuration file")
            .nth(1)
            .and_then(|s| s.split("```toml").nth(1))
            .and_then(|s| s.split("```").next())
            .unwrap();
        let mut table = String::new();
        let mut keys = Vec::new();
        for line in section.lines() {
            let line = line.trim_start();
            if let Some(rest) = line.strip_prefix('[') {
                table = rest.split(']').next().unwrap().to_string();
            } else if let Some((key, _)) = line.split_once(" = ") {
                if !key.starts_with('#') {
                    keys.push(qualified(&table, key.trim()));
                }
            }
        }
        keys
    }

    /// Each `[http]` and `[ssh]` key set to its declared default leaves
    /// the gate's configuration as the gate's own default: the declared
    /// defaults are the real ones.
    #[test]
    fn declared_defaults_are_the_gates_defaults() {
        for key in super::super::http::HttpSettings::KEYS {
            let text = format!("[http]\n{} = {}\n", key.name, key.default);
            let t: toml::Table = text.parse().unwrap();
            let mut errs = Vec::new();
            let mut cfg = httpgate::HttpConfig::default();
            super::super::http::HttpSettings::from_parent(&t, &mut errs).apply(&mut cfg);
            assert!(errs.is_empty(), "{errs:?}");
            let want = format!("{:?}", httpgate::HttpConfig::default());
            assert_eq!(format!("{cfg:?}"), want, "http.{}", key.name);
        }
        for key in super::super::ssh::SshSettings::KEYS {
            let text = format!("[ssh]\n{} = {}\n", key.name, key.default);
            let t: toml::Table = text.parse().unwrap();
            let mut errs = Vec::new();
            let mut cfg = sshgate::GatewayConfig::default();
            super::super::ssh::SshSettings::from_parent(&t, &mut errs).apply(&mut cfg);
            assert!(errs.is_empty(), "{errs:?}");
            let want = format!("{:?}", sshgate::GatewayConfig::default());
            assert_eq!(format!("{cfg:?}"), want, "ssh.{}", key.name);
        }
    }

    /// Each `[http]`, `[ssh]` and `[provision]` key, declared once,
    /// reaches the configuration it is for: set to a value other than its default, it changes
    /// what the gate gets.
    #[test]
    fn every_gate_key_reaches_the_gates_config() {
        let one = |table: &str, key: &Key| -> toml::Table {
            let mut inner = toml::Table::new();
            inner.insert(key.name.into(), (key.sample)());
            let mut t = toml::Table::new();
            t.insert(table.into(), toml::Value::Table(inner));
            t
        };
        let http_default = format!("{:?}", httpgate::HttpConfig::default());
        for key in super::super::http::HttpSettings::KEYS {
            let mut errs = Vec::new();
            let mut cfg = httpgate::HttpConfig::default();
            super::super::http::HttpSettings::from_parent(&one("http", key), &mut errs)
                .apply(&mut cfg);
            assert!(errs.is_empty(), "{errs:?}");
            assert_ne!(format!("{cfg:?}"), http_default, "http.{}", key.name);
        }
        let ssh_default = format!("{:?}", sshgate::GatewayConfig::default());
        for key in super::super::ssh::SshSettings::KEYS {
            let mut errs = Vec::new();
            let mut cfg = sshgate::GatewayConfig::default();
            super::super::ssh::SshSettings::from_parent(&one("ssh", key), &mut errs)
                .apply(&mut cfg);
            assert!(errs.is_empty(), "{errs:?}");
            assert_ne!(format!("{cfg:?}"), ssh_default, "ssh.{}", key.name);
        }
        let provision_default = format!("{:?}", super::super::ProvisionConfig::default());
        for key in super::super::provision::RawProvision::KEYS {
            let mut errs = Vec::new();
            let mut cfg = super::super::ProvisionConfig::default();
            super::super::provision::RawProvision::from_parent(&one("provision", key), &mut errs)
                .apply(&mut cfg);
            assert!(errs.is_empty(), "{errs:?}");
            assert_ne!(
                format!("{cfg:?}"),
                provision_default,
                "provision.{}",
                key.name
            );
        }
    }

    #[test]
    fn the_readme_example_lists_every_key_and_no_other() {
        let readme = readme_keys();
        let declared: Vec<String> = all()
            .iter()
            .filter(|k| (k.kind)() != "table")
            .map(Key::qualified)
            .collect();
        for key in &declared {
            assert!(readme.contains(key), "README's example lacks `{key}`");
        }
        for key in &readme {
            assert!(declared.contains(key), "README shows `{key}`, not a key");
        }
        for k in all() {
            assert!(!k.doc.is_empty(), "{} has no doc line", k.qualified());
        }
    }
}
