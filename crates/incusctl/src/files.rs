//! The files API (`/1.0/instances/{name}/files?path=...`): push, pull,
//! stat, list, mkdir and delete, with mode and ownership.
//!
//! Ownership and mode travel in the `X-Incus-uid`, `X-Incus-gid`,
//! `X-Incus-mode` and `X-Incus-type` headers. Incus applies mode and owner
//! only when it creates a file, so [`Client::push_file`] re-creates an
//! existing file whose mode or owner differ from the ones asked for.
//!
//! A file's contents are the instance's to choose: reads are capped
//! ([`DEFAULT_MAX_FILE`], or the caller's cap with
//! [`Client::pull_file_capped`]) and a longer file is refused with
//! [`Error::TooLarge`] without being read past the cap.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use crate::client::{instance_path, Client};
use crate::error::{Error, Result};
use crate::transport::{bytes_body, decode_envelope, empty_body, percent_encode, raw_error};

/// Default cap on a file read by [`Client::pull_file`]: 16 MiB.
pub const DEFAULT_MAX_FILE: usize = 16 << 20;

/// Kind of a file inside an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
}

/// Owner, mode and kind of a file inside an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    /// Owner uid (inside the instance).
    pub uid: u32,
    /// Owner gid (inside the instance).
    pub gid: u32,
    /// Permission bits, e.g. `0o600`.
    pub mode: u32,
    /// File, directory or symlink.
    pub kind: FileKind,
}

/// How to write a file.
#[derive(Debug, Clone, Copy, Default)]
pub struct PushOptions {
    /// Permission bits (default: Incus' default, 0644 for files).
    pub mode: Option<u32>,
    /// Owner uid (default root).
    pub uid: Option<u32>,
    /// Owner gid (default root).
    pub gid: Option<u32>,
    /// Create missing parent directories (mode 0755, owned like the file).
    pub create_parents: bool,
    /// Append instead of replacing.
    pub append: bool,
}

impl PushOptions {
    /// A file with this mode, owned by root.
    pub fn mode(mode: u32) -> Self {
        PushOptions {
            mode: Some(mode),
            ..PushOptions::default()
        }
    }

    /// Sets the owner.
    pub fn owner(mut self, uid: u32, gid: u32) -> Self {
        self.uid = Some(uid);
        self.gid = Some(gid);
        self
    }

    /// Creates missing parent directories.
    pub fn parents(mut self) -> Self {
        self.create_parents = true;
        self
    }
}

/// A file read from an instance.
#[derive(Debug, Clone)]
pub struct PulledFile {
    /// Contents.
    pub data: Bytes,
    /// Owner, mode, kind.
    pub meta: FileMeta,
}

fn files_path(name: &str, path: &str) -> Result<String> {
    if !path.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "file path inside an instance must be absolute: {path:?}"
        )));
    }
    Ok(format!(
        "{}/files?path={}",
        instance_path(name),
        percent_encode(path)
    ))
}

fn header_u32(headers: &HeaderMap, name: &str, radix: u32) -> Option<u32> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| u32::from_str_radix(s.trim(), radix).ok())
}

fn parse_meta(headers: &HeaderMap) -> Option<FileMeta> {
    let kind = match headers.get("X-Incus-type").and_then(|v| v.to_str().ok())? {
        "file" => FileKind::File,
        "directory" => FileKind::Directory,
        "symlink" => FileKind::Symlink,
        _ => return None,
    };
    Some(FileMeta {
        uid: header_u32(headers, "X-Incus-uid", 10)?,
        gid: header_u32(headers, "X-Incus-gid", 10)?,
        mode: header_u32(headers, "X-Incus-mode", 8)?,
        kind,
    })
}

fn parents_of(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for part in parts.iter().take(parts.len().saturating_sub(1)) {
        cur.push('/');
        cur.push_str(part);
        out.push(cur.clone());
    }
    out
}

impl Client {
    /// Writes `data` to `path` inside instance `name`.
    pub async fn push_file(
        &self,
        name: &str,
        path: &str,
        data: impl Into<Bytes>,
        opts: &PushOptions,
    ) -> Result<()> {
        let url = files_path(name, path)?;
        if opts.create_parents {
            for dir in parents_of(path) {
                self.create_dir(name, &dir, 0o755, opts.uid, opts.gid)
                    .await?;
            }
        }
        if !opts.append && (opts.mode.is_some() || opts.uid.is_some() || opts.gid.is_some()) {
            if let Some(meta) = self.stat_file(name, path).await? {
                let differs = opts.mode.is_some_and(|m| m != meta.mode)
                    || opts.uid.is_some_and(|u| u != meta.uid)
                    || opts.gid.is_some_and(|g| g != meta.gid);
                if differs && meta.kind == FileKind::File {
                    self.delete_file(name, path).await?;
                }
            }
        }
        let mut headers = HeaderMap::new();
        headers.insert("X-Incus-type", HeaderValue::from_static("file"));
        headers.insert(
            "X-Incus-write",
            HeaderValue::from_static(if opts.append { "append" } else { "overwrite" }),
        );
        insert_owner(&mut headers, opts.mode, opts.uid, opts.gid)?;
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let (status, raw) = self
            .transport()
            .raw(Method::POST, &url, headers, bytes_body(data), None)
            .await?;
        check(&Method::POST, &url, status, &raw.body)
    }

    /// Creates a directory (a no-op when it already exists).
    pub async fn create_dir(
        &self,
        name: &str,
        path: &str,
        mode: u32,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<()> {
        let url = files_path(name, path)?;
        let mut headers = HeaderMap::new();
        headers.insert("X-Incus-type", HeaderValue::from_static("directory"));
        insert_owner(&mut headers, Some(mode), uid, gid)?;
        let (status, raw) = self
            .transport()
            .raw(Method::POST, &url, headers, empty_body(), None)
            .await?;
        check(&Method::POST, &url, status, &raw.body)
    }

    /// Reads a regular file (symlinks give their target path), at most
    /// [`DEFAULT_MAX_FILE`] bytes: a longer file gives [`Error::TooLarge`].
    pub async fn pull_file(&self, name: &str, path: &str) -> Result<PulledFile> {
        self.pull_file_capped(name, path, DEFAULT_MAX_FILE).await
    }

    /// Reads a regular file of at most `max` bytes; a longer one is not
    /// read past `max` and gives [`Error::TooLarge`]. The file's contents
    /// are the instance's to choose: give the smallest cap that fits.
    pub async fn pull_file_capped(&self, name: &str, path: &str, max: usize) -> Result<PulledFile> {
        let url = files_path(name, path)?;
        let (status, raw) = self
            .transport()
            .raw_capped(Method::GET, &url, HeaderMap::new(), empty_body(), None, max)
            .await
            .map_err(|e| match e {
                Error::TooLarge { limit, .. } => Error::TooLarge {
                    what: format!("file {path} in instance \"{name}\""),
                    limit,
                },
                e => e,
            })?;
        if !status.is_success() {
            return Err(raw_error(&Method::GET, &url, status, &raw.body));
        }
        let meta = parse_meta(&raw.headers)
            .ok_or_else(|| Error::protocol(&url, "missing X-Incus-* file headers"))?;
        if meta.kind == FileKind::Directory {
            return Err(Error::InvalidArgument(format!(
                "{path} in instance \"{name}\" is a directory"
            )));
        }
        Ok(PulledFile {
            data: raw.body,
            meta,
        })
    }

    /// Waits until `path` exists in the instance and returns its contents
    /// (at most `max` bytes, as [`Client::pull_file_capped`]), polling every
    /// `interval` for at most `timeout` (for files a service inside the
    /// instance writes at boot, like sshd host keys).
    pub async fn pull_file_when_ready(
        &self,
        name: &str,
        path: &str,
        max: usize,
        interval: Duration,
        timeout: Duration,
    ) -> Result<PulledFile> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.pull_file_capped(name, path, max).await {
                Ok(f) => return Ok(f),
                Err(e) if e.is_not_found() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(interval).await;
                }
                Err(e) if e.is_not_found() => {
                    return Err(Error::Timeout {
                        what: format!("{path} to appear in instance \"{name}\""),
                        after: timeout,
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Lists the entries of a directory.
    pub async fn list_dir(&self, name: &str, path: &str) -> Result<Vec<String>> {
        let url = files_path(name, path)?;
        let (status, raw) = self
            .transport()
            .raw(Method::GET, &url, HeaderMap::new(), empty_body(), None)
            .await?;
        if !status.is_success() {
            return Err(raw_error(&Method::GET, &url, status, &raw.body));
        }
        match parse_meta(&raw.headers).map(|m| m.kind) {
            Some(FileKind::Directory) => {
                decode_envelope(&Method::GET, &url, status, &raw.body)?.into_sync(&url)
            }
            _ => Err(Error::InvalidArgument(format!(
                "{path} in instance \"{name}\" is not a directory"
            ))),
        }
    }

    /// Owner, mode and kind of `path`, or `None` when it does not exist.
    pub async fn stat_file(&self, name: &str, path: &str) -> Result<Option<FileMeta>> {
        let url = files_path(name, path)?;
        let (status, raw) = self
            .transport()
            .raw(Method::HEAD, &url, HeaderMap::new(), empty_body(), None)
            .await?;
        if status == StatusCode::NOT_FOUND {
            // HEAD has no body: tell a missing file from a missing instance.
            self.instance(name).await?;
            return Ok(None);
        }
        if !status.is_success() {
            return Err(raw_error(&Method::HEAD, &url, status, &raw.body));
        }
        parse_meta(&raw.headers)
            .map(Some)
            .ok_or_else(|| Error::protocol(&url, "missing X-Incus-* file headers"))
    }

    /// Deletes a file or an empty directory.
    pub async fn delete_file(&self, name: &str, path: &str) -> Result<()> {
        let url = files_path(name, path)?;
        let (status, raw) = self
            .transport()
            .raw(Method::DELETE, &url, HeaderMap::new(), empty_body(), None)
            .await?;
        check(&Method::DELETE, &url, status, &raw.body)
    }
}

fn insert_owner(
    headers: &mut HeaderMap,
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<()> {
    let mut put = |k: &'static str, v: String| -> Result<()> {
        let v = HeaderValue::from_str(&v)
            .map_err(|e| Error::InvalidArgument(format!("bad {k} header: {e}")))?;
        headers.insert(k, v);
        Ok(())
    };
    if let Some(m) = mode {
        put("X-Incus-mode", format!("{m:04o}"))?;
    }
    if let Some(u) = uid {
        put("X-Incus-uid", u.to_string())?;
    }
    if let Some(g) = gid {
        put("X-Incus-gid", g.to_string())?;
    }
    Ok(())
}

fn check(method: &Method, url: &str, status: StatusCode, body: &[u8]) -> Result<()> {
    if status.is_success() {
        Ok(())
    } else {
        Err(raw_error(method, url, status, body))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn parents_are_listed_top_down() {
        assert_eq!(
            parents_of("/home/u/.ssh/authorized_keys"),
            vec!["/home", "/home/u", "/home/u/.ssh"]
        );
        assert!(parents_of("/f").is_empty());
    }

    #[test]
    fn meta_headers_parse() {
        let mut h = HeaderMap::new();
        h.insert("X-Incus-type", HeaderValue::from_static("file"));
        h.insert("X-Incus-uid", HeaderValue::from_static("1000"));
        h.insert("X-Incus-gid", HeaderValue::from_static("100"));
        h.insert("X-Incus-mode", HeaderValue::from_static("0600"));
        let m = parse_meta(&h).unwrap();
        assert_eq!(m.mode, 0o600);
        assert_eq!((m.uid, m.gid), (1000, 100));
        assert_eq!(m.kind, FileKind::File);
    }

    #[test]
    fn relative_paths_are_refused() {
        assert!(matches!(
            files_path("a", "etc/passwd"),
            Err(Error::InvalidArgument(_))
        ));
    }
}
