//! Unit tests of the configuration: reading, defaults, flags over the file.

#![allow(clippy::unwrap_used)]
use super::*;

fn with_file(text: &str) -> (tempfile::NamedTempFile, ServeArgs) {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    let args = ServeArgs {
        config: Some(f.path().to_path_buf()),
        ..Default::default()
    };
    (f, args)
}

#[test]
fn flags_override_file() {
    let (_f, mut args) = with_file("state_dir = \"/a\"\nssh_listen = [\"127.0.0.1:1\"]\n");
    args.state_dir = Some("/b".into());
    let c = load(&args, None).unwrap();
    assert_eq!(c.state_dir, PathBuf::from("/b"));
    assert_eq!(c.ssh_listen, vec!["127.0.0.1:1".parse().unwrap()]);
    assert_eq!(c.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
}

#[test]
fn every_problem_reported_at_once() {
    let (_f, args) = with_file(
        "bogus = 1\nssh_listen = [\"nope\"]\ntls_mode = \"x\"\nacme_directory = \"http://a\"\nstate_dir = 3\n",
    );
    let err = load(&args, None).unwrap_err();
    assert_eq!(err.0.len(), 5, "{err}");
    let text = err.to_string();
    for needle in ["bogus", "nope", "tls_mode", "acme_directory", "state_dir"] {
        assert!(text.contains(needle), "{needle} missing from {text}");
    }
}

#[test]
fn provision_table_is_checked_key_by_key() {
    let (_f, args) = with_file(
        "[provision]\nmode = \"fast\"\nagent = \"command\"\nllm_key_file = \"/nonexistent/key\"\nbogus = 1\n",
    );
    let text = load(&args, None).unwrap_err().to_string();
    for needle in [
        "provision.mode",
        "agent_command",
        "llm_provider",
        "/nonexistent/key",
        "provision.bogus",
    ] {
        assert!(text.contains(needle), "{needle} missing from {text}");
    }
    let (_f, args) =
        with_file("[provision]\nmode = \"none\"\napt_proxy = \"http://198.18.0.1:3142\"\n");
    let p = load(&args, None).unwrap().provision;
    assert_eq!(p.mode, ProvisionMode::None);
    assert_eq!(p.golden_alias, DEFAULT_GOLDEN_ALIAS);
}

#[test]
fn edge_limits_hsts_and_ca_suffixes() {
    let (_f, args) = with_file(
        "internal_ca_suffixes = [\".corp\", \"bad suffix\"]\n[http]\nhsts_tls_modes = [\"acme\", \"sometimes\"]\n\
         max_connections_per_source = -1\n",
    );
    let text = load(&args, None).unwrap_err().to_string();
    for needle in [
        "\"bad suffix\"",
        "\"sometimes\"",
        "max_connections_per_source",
    ] {
        assert!(text.contains(needle), "{needle} missing from {text}");
    }
    let (_f, args) = with_file(
        "internal_ca_suffixes = [\".Corp.\", \"lab\"]\n[http]\nmax_connections_per_source = 0\n\
         hsts_max_age_secs = 0\nhsts_tls_modes = [\"manual\"]\n",
    );
    let c = load(&args, None).unwrap();
    assert_eq!(c.internal_ca_suffixes, vec!["corp", "lab"]);
    let mut cfg = httpgate::HttpConfig::default();
    c.http.apply(&mut cfg);
    assert_eq!(cfg.limits.max_connections_per_source, 0);
    assert_eq!(cfg.hsts.max_age_secs, 0);
    assert!(cfg.hsts.manual && !cfg.hsts.acme && !cfg.hsts.internal);
    let (_f, args) = with_file("");
    let c = load(&args, None).unwrap();
    assert_eq!(c.internal_ca_suffixes.len(), 6);
    assert!(c.internal_ca_suffixes.contains(&"home.arpa".to_string()));
}

#[test]
fn agent_login_limits_are_read_and_bounded() {
    let (_f, args) =
        with_file("[http]\nlogin_failures_per_source = 0\nlogin_max_backoff_secs = 100000\n");
    let text = load(&args, None).unwrap_err().to_string();
    for needle in [
        "http.login_failures_per_source",
        "http.login_max_backoff_secs",
    ] {
        assert!(text.contains(needle), "{needle} missing from {text}");
    }
    let (_f, args) = with_file(
        "[http]\nlogin_failures_per_source = 3\nlogin_failures_per_sandbox = 7\n\
         login_max_backoff_secs = 60\n",
    );
    let mut cfg = httpgate::HttpConfig::default();
    load(&args, None).unwrap().http.apply(&mut cfg);
    assert_eq!(cfg.login.source_free_failures, 3);
    assert_eq!(cfg.login.sandbox_free_failures, 7);
    assert_eq!(cfg.login.max_backoff, std::time::Duration::from_secs(60));
}

#[test]
fn http_table_is_checked_key_by_key() {
    let (_f, args) = with_file(
        "[http]\ntrusted_proxies = [\"10.0.0.1\", \"nope\"]\nmax_connections = 0\nidle_timeout_secs = \"x\"\nbogus = 1\n",
    );
    let text = load(&args, None).unwrap_err().to_string();
    for needle in [
        "\"nope\"",
        "http.max_connections",
        "idle_timeout_secs",
        "http.bogus",
    ] {
        assert!(text.contains(needle), "{needle} missing from {text}");
    }
    let (_f, args) = with_file(
        "[http]\ntrusted_proxies = [\"10.0.0.1\", \"::1\"]\nidle_timeout_secs = 30\n\
         upstream_idle_timeout_secs = 7\nh2_ping_interval_secs = 11\nh2_ping_timeout_secs = 13\n",
    );
    let h = load(&args, None).unwrap().http;
    let mut cfg = httpgate::HttpConfig::default();
    let before = cfg.timeouts.upstream_connect;
    h.apply(&mut cfg);
    assert_eq!(cfg.trusted_proxies.len(), 2);
    assert_eq!(cfg.timeouts.idle, std::time::Duration::from_secs(30));
    assert_eq!(
        (
            cfg.timeouts.upstream_pool_idle,
            cfg.timeouts.h2_ping_interval,
            cfg.timeouts.h2_ping_timeout
        ),
        (
            std::time::Duration::from_secs(7),
            std::time::Duration::from_secs(11),
            std::time::Duration::from_secs(13)
        )
    );
    assert_eq!(
        cfg.timeouts.upstream_connect, before,
        "unset keys keep the default"
    );
}

#[test]
fn ssh_table_is_checked_and_applied() {
    let (_f, args) = with_file(
        "[ssh]\nmax_startups = \"5:30:2\"\nper_source_max_startups = 0\n\
         max_channels_per_connection = 0\nlogin_grace_secs = \"x\"\nbogus = 1\n",
    );
    let text = load(&args, None).unwrap_err().to_string();
    for needle in [
        "ssh.max_startups",
        "ssh.per_source_max_startups",
        "ssh.max_channels_per_connection",
        "login_grace_secs",
        "ssh.bogus",
    ] {
        assert!(text.contains(needle), "{needle} missing from {text}");
    }
    let (_f, args) = with_file(
        "[ssh]\nmax_startups = \"50:20:100\"\nper_source_max_startups = 4\n\
         login_grace_secs = 20\nmax_sessions_per_sandbox = 8\nrelay_buffer_mib = 64\n",
    );
    let s = load(&args, None).unwrap().ssh;
    let mut cfg = sshgate::GatewayConfig::default();
    let channels = cfg.max_channels_per_connection;
    s.apply(&mut cfg);
    assert_eq!(cfg.max_startups.to_string(), "50:20:100");
    assert_eq!(cfg.per_source_max_startups, sshgate::Startups::hard(4));
    assert_eq!(cfg.login_grace, std::time::Duration::from_secs(20));
    assert_eq!(cfg.max_sessions_per_sandbox, 8);
    assert_eq!(cfg.relay_budget, 64 * 1024 * 1024);
    assert_eq!(
        cfg.max_channels_per_connection, channels,
        "unset keys keep the default"
    );
}

#[test]
fn acme_and_http_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("root.txt");
    std::fs::write(&not_pem, "hello").unwrap();
    let (_f, args) = with_file(&format!("acme_ca_root = \"{}\"\n", not_pem.display()));
    let text = load(&args, None).unwrap_err().to_string();
    assert!(text.contains("no PEM certificate"), "{text}");
    let (_f, args) = with_file("acme_challenges = [\"dns-01\"]\n");
    let text = load(&args, None).unwrap_err().to_string();
    assert!(
        text.contains("\"dns-01\" is not http-01 or tls-alpn-01"),
        "{text}"
    );
    let (_f, args) = with_file("acme_challenges = []\n");
    assert!(load(&args, None).is_err());
    let (_f, args) = with_file("acme_challenges = [\"http-01\"]\n");
    let c = load(&args, None).unwrap();
    assert_eq!(c.acme_challenges, vec![httpgate::ChallengeKind::Http01]);
    assert!(c.acme_ca_root.is_none());
}

/// Each top-level key whose declared default is a TOML value, set to
/// it, gives the configuration of an empty file.
#[test]
fn declared_defaults_are_the_defaults() {
    let (_f, args) = with_file("");
    let want = format!("{:?}", load(&args, None).unwrap());
    let mut tried = 0;
    for key in RawFile::KEYS {
        let text = format!("{} = {}\n", key.name, key.default);
        if text.parse::<toml::Table>().is_err() {
            continue;
        }
        tried += 1;
        let (_f, args) = with_file(&text);
        let got = format!("{:?}", load(&args, None).unwrap());
        assert_eq!(got, want, "{}", key.name);
    }
    assert!(tried >= 8, "{tried}");
}

#[test]
fn empty_list_disables_a_listener() {
    let (_f, args) = with_file("http_listen = []\n");
    assert!(load(&args, None).unwrap().http_listen.is_empty());
}

/// An empty file gives the defaults declared with the keys.
#[test]
fn an_empty_file_gives_the_declared_defaults() {
    let (_f, args) = with_file("");
    let c = load(&args, None).unwrap();
    assert_eq!(c.state_dir, PathBuf::from("/var/lib/sandboxd"));
    assert_eq!(c.admin_socket, PathBuf::from("/run/sandboxd/admin.sock"));
    let addrs = |v: &[&str]| -> Vec<SocketAddr> { v.iter().map(|a| a.parse().unwrap()).collect() };
    assert_eq!(c.ssh_listen, addrs(&["0.0.0.0:2222", "[::]:2222"]));
    assert_eq!(c.https_listen, addrs(&["0.0.0.0:443", "[::]:443"]));
    assert_eq!(c.http_listen, addrs(&["0.0.0.0:80", "[::]:80"]));
    assert_eq!(
        c.acme_directory,
        "https://acme-v02.api.letsencrypt.org/directory"
    );
    assert_eq!(
        c.acme_challenges,
        vec![
            httpgate::ChallengeKind::TlsAlpn01,
            httpgate::ChallengeKind::Http01
        ]
    );
    assert_eq!(c.log, "info");
    assert_eq!(c.incus.default_image, "debian/12");
    assert_eq!(c.incus.reconcile_secs, 30);
    assert_eq!(c.incus.socket, None);
    assert_eq!(DEFAULT_STATE_DIR, "/var/lib/sandboxd");
    assert_eq!(DEFAULT_ADMIN_SOCKET, "/run/sandboxd/admin.sock");
    let p = &c.provision;
    assert_eq!(p.mode, ProvisionMode::Auto);
    assert_eq!(
        (p.packages.as_str(), p.agent.as_str()),
        ("distro", "shelley")
    );
    assert_eq!(p.golden_alias, "sandboxd/golden");
    assert_eq!(DEFAULT_GOLDEN_ALIAS, "sandboxd/golden");
    assert!(p.apt_proxy.is_none() && p.llm_provider.is_none() && p.hook.is_none());
}

/// `sandboxd serve --help` shows the defaults declared with the keys.
#[test]
fn serve_help_shows_the_declared_defaults() {
    use clap::Args as _;
    let mut cmd = ServeArgs::augment_args(clap::Command::new("serve")).term_width(1000);
    let help = cmd.render_help().to_string();
    for line in [
        "Address for the SSH router (repeatable) [default: 0.0.0.0:2222 and [::]:2222]",
        "Address for HTTPS (repeatable) [default: 0.0.0.0:443 and [::]:443]",
        "ACME directory URL [default: https://acme-v02.api.letsencrypt.org/directory]",
        "Incus unix socket [default: /var/lib/incus/unix.socket or /run/incus/unix.socket]",
    ] {
        assert!(help.contains(line), "{line:?} missing from {help}");
    }
}

/// A key declared once, with the field it sets, is read from the file and
/// reaches the gate's configuration; keys not given keep the gate's default.
#[test]
fn a_declared_key_reaches_the_gate() {
    let (_f, args) =
        with_file("[http]\nidle_timeout_secs = 7\n[ssh]\nrelay_buffer_per_sandbox_mib = 3\n");
    let c = load(&args, None).unwrap();
    let mut http = httpgate::HttpConfig::default();
    let header = http.timeouts.header_read;
    c.http.apply(&mut http);
    assert_eq!(http.timeouts.idle, std::time::Duration::from_secs(7));
    assert_eq!(http.timeouts.header_read, header);
    let mut ssh = sshgate::GatewayConfig::default();
    c.ssh.apply(&mut ssh);
    assert_eq!(ssh.relay_budget_per_sandbox, 3 * 1024 * 1024);
}

#[test]
fn the_default_tls_mode_is_internal_or_acme_never_manual() {
    let (_f, args) = with_file("");
    assert_eq!(load(&args, None).unwrap().tls_mode, TlsMode::Internal);
    let (_f, mut args) = with_file("tls_mode = \"acme\"\n");
    let c = load(&args, None).unwrap();
    assert_eq!(c.tls_mode, TlsMode::Acme);
    assert!(matches!(c.default_route_tls(), httpgate::TlsMode::Acme));
    // A flag overrides the file.
    args.tls_mode = Some(TlsMode::Internal);
    assert_eq!(load(&args, None).unwrap().tls_mode, TlsMode::Internal);
    let (_f, args) = with_file("tls_mode = \"manual\"\n");
    let err = load(&args, None).unwrap_err().to_string();
    assert!(
        err.contains("`tls_mode` must be internal or acme, not \"manual\""),
        "{err}"
    );
    // The flag takes the same two names.
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }
    let cli = Cli::try_parse_from(["sandboxd", "--tls-mode", "acme"]).unwrap();
    assert_eq!(cli.serve.tls_mode, Some(TlsMode::Acme));
    assert!(Cli::try_parse_from(["sandboxd", "--tls-mode", "manual"]).is_err());
}
