//! The configuration file's keys, each declared once: its table, name,
//! type, default and a line of documentation, in a [`config_keys!`] block.
//! From that one line come the raw value's field, its reading from TOML
//! (type and range checked, every problem collected), the unknown-key
//! check with its list of known keys, and [`ALL`], which the README test
//! holds against the README's example. What a value means (an address, a
//! mode, a file that must exist) is checked after reading, by the table's
//! own module.

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

/// A value type of the configuration file: how it is read from TOML.
pub(crate) trait Kind {
    type Value;
    /// The type as people read it.
    fn describe() -> String;
    /// Reads `value` of the key `key` (qualified); a wrong type or range is
    /// pushed to `errs` and gives `None`.
    fn take(value: &toml::Value, key: &str, errs: &mut Vec<String>) -> Option<Self::Value>;
}

/// A string.
pub(crate) struct Str;

impl Kind for Str {
    type Value = String;
    fn describe() -> String {
        "string".into()
    }
    fn take(value: &toml::Value, key: &str, errs: &mut Vec<String>) -> Option<String> {
        match value {
            toml::Value::String(s) => Some(s.clone()),
            other => {
                errs.push(format!(
                    "`{key}` must be a string, not {}",
                    other.type_str()
                ));
                None
            }
        }
    }
}

/// A list of strings (one string is a list of one).
pub(crate) struct List;

impl Kind for List {
    type Value = Vec<String>;
    fn describe() -> String {
        "list of strings".into()
    }
    fn take(value: &toml::Value, key: &str, errs: &mut Vec<String>) -> Option<Vec<String>> {
        match value {
            toml::Value::Array(items) => {
                let mut out = Vec::new();
                for item in items {
                    match item {
                        toml::Value::String(s) => out.push(s.clone()),
                        other => errs.push(format!(
                            "`{key}` must be a list of strings; found {}",
                            other.type_str()
                        )),
                    }
                }
                Some(out)
            }
            toml::Value::String(s) => Some(vec![s.clone()]),
            other => {
                errs.push(format!(
                    "`{key}` must be a list of strings, not {}",
                    other.type_str()
                ));
                None
            }
        }
    }
}

/// An integer within `LO..=HI` (`LO` >= 0).
pub(crate) struct Int<const LO: i64, const HI: i64>;

impl<const LO: i64, const HI: i64> Kind for Int<LO, HI> {
    type Value = u64;
    fn describe() -> String {
        format!("integer {LO}..={HI}")
    }
    fn take(value: &toml::Value, key: &str, errs: &mut Vec<String>) -> Option<u64> {
        match value {
            toml::Value::Integer(n) if (LO..=HI).contains(n) => Some(n.unsigned_abs()),
            toml::Value::Integer(n) => {
                errs.push(format!("`{key}` must be between {LO} and {HI}, not {n}"));
                None
            }
            other => {
                errs.push(format!(
                    "`{key}` must be an integer, not {}",
                    other.type_str()
                ));
                None
            }
        }
    }
}

/// sshd's `MaxStartups`: `start:rate:full`, or one positive integer.
pub(crate) struct Startups;

impl Kind for Startups {
    type Value = sshgate::Startups;
    fn describe() -> String {
        "string start:rate:full or positive integer".into()
    }
    fn take(value: &toml::Value, key: &str, errs: &mut Vec<String>) -> Option<Self::Value> {
        match value {
            toml::Value::String(v) => match v.parse::<sshgate::Startups>() {
                Ok(x) => Some(x),
                Err(e) => {
                    errs.push(format!("`{key}`: {e}"));
                    None
                }
            },
            toml::Value::Integer(n) => match u32::try_from(*n) {
                Ok(n) if n > 0 => Some(sshgate::Startups::hard(n)),
                _ => {
                    errs.push(format!("`{key}` must be positive, not {n}"));
                    None
                }
            },
            other => {
                errs.push(format!(
                    "`{key}` must be a string like \"10:30:100\", not {}",
                    other.type_str()
                ));
                None
            }
        }
    }
}

/// A sub-table (`[http]`): its keys are declared by its own block, and it
/// is read by its own module.
pub(crate) struct Table;

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
///     /// doc of the raw struct
///     pub(crate) struct RawHttp in "http" {
///         /// X-Forwarded-* kept only from these peers.
///         trusted_proxies: List = "[]",
///         max_connections: Int<1, 1_000_000> = "10000",
///     }
/// }
/// ```
///
/// makes `RawHttp` (one `Option` per key), `RawHttp::KEYS` and
/// `RawHttp::read(&toml::Table, &mut errs)`, which reports unknown keys
/// and wrong types and ranges.
macro_rules! config_keys {
    (
        $(#[$meta:meta])*
        $vis:vis struct $raw:ident in $table:literal {
            $( $(#[doc = $doc:literal])+ $key:ident : $kind:ty = $default:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        $vis struct $raw {
            $( pub $key: Option<<$kind as $crate::config::keys::Kind>::Value>, )*
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
        }
    };
}

pub(crate) use config_keys;

impl Kind for Table {
    type Value = ();
    fn describe() -> String {
        "table".into()
    }
    fn take(_: &toml::Value, _: &str, _: &mut Vec<String>) -> Option<()> {
        None
    }
}

/// Every key of the configuration file, every table.
pub fn all() -> Vec<Key> {
    [
        super::RawFile::KEYS,
        super::provision::RawProvision::KEYS,
        super::http::RawHttp::KEYS,
        super::ssh::RawSsh::KEYS,
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
        for key in super::super::http::RawHttp::KEYS {
            let text = format!("[http]\n{} = {}\n", key.name, key.default);
            let t: toml::Table = text.parse().unwrap();
            let mut errs = Vec::new();
            let mut cfg = httpgate::HttpConfig::default();
            super::super::http::read(&t, &mut errs).apply(&mut cfg);
            assert!(errs.is_empty(), "{errs:?}");
            let want = format!("{:?}", httpgate::HttpConfig::default());
            assert_eq!(format!("{cfg:?}"), want, "http.{}", key.name);
        }
        for key in super::super::ssh::RawSsh::KEYS {
            let text = format!("[ssh]\n{} = {}\n", key.name, key.default);
            let t: toml::Table = text.parse().unwrap();
            let mut errs = Vec::new();
            let mut cfg = sshgate::GatewayConfig::default();
            super::super::ssh::read(&t, &mut errs).apply(&mut cfg);
            assert!(errs.is_empty(), "{errs:?}");
            let want = format!("{:?}", sshgate::GatewayConfig::default());
            assert_eq!(format!("{cfg:?}"), want, "ssh.{}", key.name);
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
