//! The host-side helpers of `sandboxd setup`: running commands, reading
//! `/etc/os-release`, deriving apt sources, files and directories with
//! their modes and owners.

use super::*;

/// True when systemd is the init system (the test `sd_booted()` makes).
pub(super) fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

pub(super) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A command as people write it: the program and its arguments.
fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command; a failure carries its last output lines.
pub(super) fn run(cmd: &mut Command) -> Result<String> {
    let shown = command_line(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{shown} failed ({}): {}", out.status, tail.join(" / "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(super) fn os_release() -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .context("cannot read /etc/os-release")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect())
}

/// Derives the bookworm-backports sources from the machine's own Debian
/// sources (deb822 stanzas): the stanzas whose suites include `bookworm`,
/// with their suite changed. No archive address is written by us.
pub fn derive_backports(debian_sources: &str) -> Option<String> {
    let mut out = String::new();
    for stanza in debian_sources.split("\n\n") {
        let mut keep = false;
        let mut lines = Vec::new();
        for line in stanza.lines() {
            if let Some(suites) = line.strip_prefix("Suites:") {
                keep = suites.split_whitespace().any(|s| s == "bookworm");
                lines.push("Suites: bookworm-backports".to_string());
            } else {
                lines.push(line.to_string());
            }
        }
        if keep {
            out.push_str(&lines.join("\n"));
            out.push_str("\n\n");
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The same for a one-line-style `sources.list`.
pub(super) fn derive_backports_list(list: &str) -> Option<String> {
    let out: Vec<String> = list
        .lines()
        .filter(|l| l.trim_start().starts_with("deb "))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let i = words.iter().position(|w| *w == "bookworm")?;
            let mut w = words.clone();
            w[i] = "bookworm-backports";
            Some(w.join(" "))
        })
        .collect();
    (!out.is_empty()).then(|| out.join("\n") + "\n")
}

pub(super) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("sandboxd-tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub(super) fn user_ids(name: &str) -> Result<(nix::unistd::Uid, nix::unistd::Gid)> {
    let u = nix::unistd::User::from_name(name)?.with_context(|| format!("no user {name:?}"))?;
    Ok((u.uid, u.gid))
}

/// Makes `dir` exist with `mode`, owned by `owner`; says whether it changed.
pub(super) fn ensure_dir(
    dir: &Path,
    mode: u32,
    owner: (nix::unistd::Uid, nix::unistd::Gid),
) -> Result<bool> {
    let mut changed = false;
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        changed = true;
    }
    let meta = std::fs::metadata(dir)?;
    if meta.mode() & 0o7777 != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
        changed = true;
    }
    if meta.uid() != owner.0.as_raw() || meta.gid() != owner.1.as_raw() {
        std::os::unix::fs::chown(dir, Some(owner.0.as_raw()), Some(owner.1.as_raw()))?;
        changed = true;
    }
    Ok(changed)
}

pub(super) fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// A TOML string holding `s`.
pub(super) fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn backports_from_deb822() {
        let src = "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n";
        let out = derive_backports(src).unwrap();
        assert_eq!(out.matches("Suites: bookworm-backports").count(), 1);
        assert!(!out.contains("security"));
        assert!(out.contains("URIs: http://mirror.invalid/debian\n"));
        assert!(derive_backports("Types: deb\nSuites: trixie\n").is_none());
    }

    #[test]
    fn commands_and_toml_strings_are_written_as_people_read_them() {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "incus"])
            .env("DEBIAN_FRONTEND", "noninteractive");
        assert_eq!(command_line(&cmd), "apt-get install -y incus");
        assert_eq!(toml_list(&["[::]:2222".into()]), "[\"[::]:2222\"]");
        let list = toml_list(&["0.0.0.0:2222".into(), "/srv/caf\u{e9} \"x\"".into()]);
        let parsed: toml::Table = format!("k = {list}").parse().unwrap();
        assert_eq!(
            parsed["k"].as_array().unwrap()[1].as_str(),
            Some("/srv/caf\u{e9} \"x\"")
        );
    }

    #[test]
    fn backports_from_sources_list() {
        let out = derive_backports_list(
            "deb http://m.invalid/debian bookworm main\ndeb http://m.invalid/s bookworm-security main\n",
        )
        .unwrap();
        assert_eq!(out, "deb http://m.invalid/debian bookworm-backports main\n");
    }
}
