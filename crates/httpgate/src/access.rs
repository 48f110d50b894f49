//! Who may use a route: the one gate every proxied request passes.
//!
//! [`admit`] is the only way to get a [`Pass`], and forwarding a request
//! upstream takes one, so no code path reaches a sandbox without this check.
//! In order, cheapest first:
//!
//! 1. Closed: an agent route without a login ([`Access::Closed`], or
//!    [`Access::Open`], which an agent route never is) answers 401 with a
//!    page saying that no login is set. The page has no `WWW-Authenticate`
//!    challenge: no credentials could open it, so a browser should show the
//!    page rather than prompt.
//! 2. No ambient authority (agent routes): browsers resend cached basic-auth
//!    credentials with requests that other sites' pages make. A request that
//!    could change something (any method but GET, HEAD and OPTIONS) or open
//!    a tunnel (any `Upgrade`, websockets included) is refused with 403
//!    when it carries an `Origin` other than the agent host's own
//!    (`https://` + the host and port the client used), or a
//!    `Sec-Fetch-Site` other than `same-origin` (`same-site`, i.e. the app
//!    domain, included). A request with neither header is not from a
//!    browser (curl, scripts): those send credentials only when told to, and
//!    pass. Safe requests pass whatever their origin: cross-site
//!    navigation to the agent's page must work, and the browser keeps other
//!    sites from reading the answers.
//! 3. The login ([`Access::Login`]): 401 with a challenge, or 429 with
//!    `Retry-After` when the source or the sandbox is backing off
//!    (`auth.rs`); a 429 is held for half to all of `refusal_delay`
//!    (at most the time left) before it is sent.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderValue, AUTHORIZATION, HOST, RETRY_AFTER};
use http::{Method, Request, StatusCode};

use crate::auth::Verdict;
use crate::gateway::Shared;
use crate::RespBody;
use crate::{pages, Access, Route, RouteKind};

/// Proof that a request was admitted to its route; only [`admit`] makes one.
#[derive(Debug)]
pub(crate) struct Pass {
    /// The request's `Authorization` carried the route's login (not to be
    /// sent upstream).
    pub(crate) strip_authorization: bool,
    _private: (),
}

/// The route's verdict on `req`: a [`Pass`], or the page to answer with.
pub(crate) async fn admit<B>(
    shared: &Shared,
    peer: IpAddr,
    req: &Request<B>,
    route: &Route,
) -> Result<Pass, Box<http::Response<RespBody>>> {
    let login = match (&route.access, route.kind) {
        (Access::Login(ba), _) => Some(ba),
        (Access::Open, RouteKind::App) => None,
        (Access::Open | Access::Closed, _) => return Err(Box::new(closed(route))),
    };
    if route.kind == RouteKind::Agent && !same_origin_or_not_browser(req) {
        return Err(Box::new(pages::error(
            StatusCode::FORBIDDEN,
            &format!(
                "Refused: a page of another site cannot send this request to the agent of \
                 sandbox {}. Open the agent's own page to use it.",
                route.sandbox
            ),
        )));
    }
    let Some(ba) = login else {
        return Ok(Pass {
            strip_authorization: false,
            _private: (),
        });
    };
    let header = req.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
    match shared.auth.check(&route.sandbox, ba, header, peer).await {
        Verdict::Granted => Ok(Pass {
            strip_authorization: true,
            _private: (),
        }),
        Verdict::Denied => Err(Box::new(pages::unauthorized(&shared.config.auth_realm))),
        Verdict::Backoff(wait) => {
            // Jittered (half to all of the delay), so that the held
            // answers of many connections do not all come due at once.
            let jitter = 0.5 + rand::random::<f64>() / 2.0;
            let hold = wait.min(shared.config.login.refusal_delay).mul_f64(jitter);
            if !hold.is_zero() {
                tokio::time::sleep(hold).await;
            }
            let left = wait.saturating_sub(hold);
            Err(Box::new(too_many(left.as_secs() + 1)))
        }
    }
}

fn closed(route: &Route) -> http::Response<RespBody> {
    pages::error(
        StatusCode::UNAUTHORIZED,
        &format!(
            "The agent of sandbox {name} has no login set, so it is closed. \
             `sandboxd auth {name} USER` sets one.",
            name = route.sandbox
        ),
    )
}

fn too_many(retry_after: u64) -> http::Response<RespBody> {
    let mut r = pages::error(
        StatusCode::TOO_MANY_REQUESTS,
        &format!("Too many failed logins. Try again in {retry_after} s."),
    );
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after));
    r
}

/// Whether a request may act on an agent host: a safe method without
/// upgrade, or a same-origin browser request, or no browser at all.
fn same_origin_or_not_browser<B>(req: &Request<B>) -> bool {
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let h = req.headers();
    if safe && !h.contains_key(http::header::UPGRADE) {
        return true;
    }
    if let Some(site) = h.get("sec-fetch-site") {
        if site.as_bytes() != b"same-origin" {
            return false;
        }
    }
    match h.get(http::header::ORIGIN) {
        Some(origin) => authority(req, h).is_some_and(|a| is_own_origin(origin.as_bytes(), a)),
        None => true,
    }
}

/// The host and port the client addressed (`:authority`, absolute URI, or Host).
fn authority<'a, B>(req: &'a Request<B>, h: &'a HeaderMap) -> Option<&'a [u8]> {
    match req.uri().authority() {
        Some(a) => Some(a.as_str().as_bytes()),
        None => h.get(HOST).map(|v| v.as_bytes()),
    }
}

/// `origin` is `https://` + `authority` (case aside, `:443` implied).
fn is_own_origin(origin: &[u8], authority: &[u8]) -> bool {
    const SCHEME: &[u8] = b"https://";
    if origin.len() < SCHEME.len() || !origin[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return false;
    }
    let rest = &origin[SCHEME.len()..];
    let norm = |a: &'_ [u8]| -> usize { a.len() - if a.ends_with(b":443") { 4 } else { 0 } };
    let (o, a) = (&rest[..norm(rest)], &authority[..norm(authority)]);
    !a.is_empty() && o.eq_ignore_ascii_case(a)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn req(method: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder()
            .method(method)
            .uri("/x")
            .header(HOST, "shelley.app.test:8443");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn unsafe_requests_need_the_agent_hosts_own_origin() {
        let own = "https://shelley.app.test:8443";
        let ok = [
            req("GET", &[("origin", "https://evil.test")]),
            req("GET", &[("sec-fetch-site", "cross-site")]),
            req("OPTIONS", &[("origin", "https://evil.test")]),
            req("POST", &[]),
            req("POST", &[("origin", own)]),
            req("POST", &[("origin", "HTTPS://Shelley.App.Test:8443")]),
            req("PUT", &[("sec-fetch-site", "same-origin")]),
            req(
                "POST",
                &[("origin", own), ("sec-fetch-site", "same-origin")],
            ),
            req("GET", &[("upgrade", "websocket"), ("origin", own)]),
            req("GET", &[("upgrade", "websocket")]),
        ];
        for r in &ok {
            assert!(same_origin_or_not_browser(r), "{r:?}");
        }
        let refused = [
            req("POST", &[("origin", "https://app.test:8443")]),
            req("POST", &[("origin", "https://evil.test")]),
            req("POST", &[("origin", "null")]),
            req("POST", &[("origin", "http://shelley.app.test:8443")]),
            req("POST", &[("origin", "https://shelley.app.test")]),
            req("POST", &[("origin", "https://shelley.app.test:8443.evil")]),
            req("DELETE", &[("sec-fetch-site", "same-site")]),
            req("POST", &[("sec-fetch-site", "cross-site")]),
            req("POST", &[("sec-fetch-site", "none")]),
            req("POST", &[("origin", own), ("sec-fetch-site", "cross-site")]),
            req(
                "GET",
                &[
                    ("upgrade", "websocket"),
                    ("origin", "https://app.test:8443"),
                ],
            ),
            req(
                "GET",
                &[("upgrade", "websocket"), ("sec-fetch-site", "same-site")],
            ),
        ];
        for r in &refused {
            assert!(!same_origin_or_not_browser(r), "{r:?}");
        }
    }

    #[test]
    fn default_port_is_implied() {
        assert!(is_own_origin(b"https://a.test", b"a.test:443"));
        assert!(is_own_origin(b"https://a.test:443", b"a.test"));
        assert!(!is_own_origin(b"https://", b""));
    }
}
