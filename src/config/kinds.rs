//! The value types of the configuration file ([`Kind`]): how each is
//! read from TOML, type and range checked, with every problem collected.

/// A value type of the configuration file: how it is read from TOML.
pub(crate) trait Kind {
    type Value;
    /// The type as people read it.
    fn describe() -> String;
    /// Reads `value` of the key `key` (qualified); a wrong type or range is
    /// pushed to `errs` and gives `None`.
    fn take(value: &toml::Value, key: &str, errs: &mut Vec<String>) -> Option<Self::Value>;
    /// A valid value, for tests that a key reaches what it configures.
    #[cfg(test)]
    fn sample() -> toml::Value;
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
    #[cfg(test)]
    fn sample() -> toml::Value {
        toml::Value::String("sample".into())
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
    #[cfg(test)]
    fn sample() -> toml::Value {
        toml::Value::Array(vec!["sample".into()])
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
    #[cfg(test)]
    fn sample() -> toml::Value {
        toml::Value::Integer(HI)
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
    #[cfg(test)]
    fn sample() -> toml::Value {
        toml::Value::String("3:50:7".into())
    }
}

/// A list of IP addresses.
pub(crate) struct Ips;

impl Kind for Ips {
    type Value = Vec<std::net::IpAddr>;
    fn describe() -> String {
        "list of IP addresses".into()
    }
    fn take(value: &toml::Value, key: &str, errs: &mut Vec<String>) -> Option<Self::Value> {
        let mut out = Vec::new();
        for ip in List::take(value, key, errs)? {
            match ip.parse() {
                Ok(a) => out.push(a),
                Err(_) => errs.push(format!("`{key}`: {ip:?} is not an IP address")),
            }
        }
        Some(out)
    }
    #[cfg(test)]
    fn sample() -> toml::Value {
        toml::Value::Array(vec!["192.0.2.1".into()])
    }
}

/// A list of certificate modes (`acme`, `manual`, `internal`).
pub(crate) struct TlsModes;

impl Kind for TlsModes {
    type Value = Vec<store::TlsMode>;
    fn describe() -> String {
        "list of acme, manual, internal".into()
    }
    fn take(value: &toml::Value, key: &str, errs: &mut Vec<String>) -> Option<Self::Value> {
        let mut out = Vec::new();
        for m in List::take(value, key, errs)? {
            match m.parse() {
                Ok(mode) => out.push(mode),
                Err(_) => errs.push(format!("`{key}`: {m:?} is not acme, manual or internal")),
            }
        }
        Some(out)
    }
    #[cfg(test)]
    fn sample() -> toml::Value {
        toml::Value::Array(vec!["manual".into()])
    }
}

/// A fixed set of words, for `Choice`.
pub(crate) trait Choices {
    const ALL: &'static [&'static str];
}

/// A string that is one of `C::ALL`.
pub(crate) struct Choice<C>(std::marker::PhantomData<C>);

impl<C: Choices> Kind for Choice<C> {
    type Value = String;
    fn describe() -> String {
        format!("one of {}", C::ALL.join(", "))
    }
    fn take(value: &toml::Value, key: &str, errs: &mut Vec<String>) -> Option<String> {
        let v = Str::take(value, key, errs)?;
        if C::ALL.contains(&v.as_str()) {
            Some(v)
        } else {
            errs.push(format!(
                "`{key}` must be one of {}, not {v:?}",
                C::ALL.join(", ")
            ));
            None
        }
    }
    #[cfg(test)]
    fn sample() -> toml::Value {
        toml::Value::String(C::ALL.last().copied().unwrap_or_default().into())
    }
}

/// A string parsed by `T`'s `FromStr`, whose error is a sentence.
pub(crate) struct Parsed<T>(std::marker::PhantomData<T>);

impl<T: std::str::FromStr<Err = String> + Choices> Kind for Parsed<T> {
    type Value = T;
    fn describe() -> String {
        format!("one of {}", T::ALL.join(", "))
    }
    fn take(value: &toml::Value, key: &str, errs: &mut Vec<String>) -> Option<T> {
        match Str::take(value, key, errs)?.parse() {
            Ok(v) => Some(v),
            Err(e) => {
                errs.push(format!("`{key}`: {e}"));
                None
            }
        }
    }
    #[cfg(test)]
    fn sample() -> toml::Value {
        toml::Value::String(T::ALL.last().copied().unwrap_or_default().into())
    }
}

/// `n` seconds.
pub(crate) fn secs(n: u64) -> std::time::Duration {
    std::time::Duration::from_secs(n)
}

/// `n` as a count or size (the keys' ranges fit; larger saturates).
pub(crate) fn size(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// `n` as a 32-bit count (the keys' ranges fit; larger saturates).
pub(crate) fn count(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A sub-table (`[http]`): its keys are declared by its own block, and it
/// is read by its own module.
pub(crate) struct Table;

impl Kind for Table {
    type Value = ();
    fn describe() -> String {
        "table".into()
    }
    fn take(_: &toml::Value, _: &str, _: &mut Vec<String>) -> Option<()> {
        None
    }
    #[cfg(test)]
    fn sample() -> toml::Value {
        toml::Value::Table(toml::Table::new())
    }
}
