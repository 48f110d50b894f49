//! Small responses the gateway writes itself: error pages (naming the
//! sandbox and its state where there is one), redirects, challenge answers.

use bytes::Bytes;
use http::header::{
    HeaderValue, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE,
};
use http::{Response, StatusCode};

use crate::RespBody;

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An HTML error page.
pub(crate) fn error(status: StatusCode, detail: &str) -> Response<RespBody> {
    let reason = status.canonical_reason().unwrap_or("Error");
    let body = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{code} {reason}</title></head>\n\
         <body><h1>{code} {reason}</h1>\n<p>{detail}</p>\n<hr><p>sandboxd</p></body></html>\n",
        code = status.as_u16(),
        detail = escape(detail),
    );
    let mut resp = Response::new(RespBody::full(Bytes::from(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// 400 that also closes the connection (the framing can no longer be trusted).
pub(crate) fn bad_request(detail: &str) -> Response<RespBody> {
    let mut r = error(StatusCode::BAD_REQUEST, detail);
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    r
}

/// 401 with a basic-auth challenge.
pub(crate) fn unauthorized(realm: &str) -> Response<RespBody> {
    let mut r = error(StatusCode::UNAUTHORIZED, "Authentication required.");
    let v = format!(
        "Basic realm=\"{}\", charset=\"UTF-8\"",
        realm.replace('"', "")
    );
    if let Ok(v) = HeaderValue::from_str(&v) {
        r.headers_mut().insert(WWW_AUTHENTICATE, v);
    }
    r
}

/// 301 to `location`.
pub(crate) fn redirect(location: &str) -> Response<RespBody> {
    let mut r = Response::new(RespBody::full(Bytes::new()));
    *r.status_mut() = StatusCode::MOVED_PERMANENTLY;
    match HeaderValue::from_str(location) {
        Ok(v) => {
            r.headers_mut().insert(LOCATION, v);
            r
        }
        Err(_) => error(StatusCode::BAD_REQUEST, "Malformed request target."),
    }
}

/// 200 text/plain (ACME HTTP-01 key authorization).
pub(crate) fn text(body: String) -> Response<RespBody> {
    let mut r = Response::new(RespBody::full(Bytes::from(body)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}
