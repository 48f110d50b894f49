//! The local image store: list images, import from tarballs (split
//! metadata + rootfs, or one unified tarball), and manage aliases
//! (`/1.0/images`, `/1.0/images/aliases`).
//!
//! Uploads stream from disk; nothing is held whole in memory.

use std::path::Path;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{HeaderMap, HeaderValue, Method};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::json;
use tokio::io::AsyncReadExt;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::transport::{decode_envelope, percent_encode, ReqBody};
use crate::types::{Image, ImageAlias};

/// Where image tarballs come from.
#[derive(Debug, Clone, Copy)]
pub enum ImageTarballs<'a> {
    /// A metadata tarball (`metadata.yaml`, templates) and a rootfs tarball.
    Split {
        /// Metadata tarball.
        metadata: &'a Path,
        /// Root filesystem tarball.
        rootfs: &'a Path,
    },
    /// One tarball holding `metadata.yaml` and `rootfs/`.
    Unified(&'a Path),
}

fn alias_path(alias: &str) -> String {
    format!("/1.0/images/aliases/{}", percent_encode(alias))
}

async fn open(path: &Path) -> Result<(tokio::fs::File, u64)> {
    let f = tokio::fs::File::open(path)
        .await
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let len = f
        .metadata()
        .await
        .map_err(|e| Error::io(format!("reading size of {}", path.display()), e))?
        .len();
    Ok((f, len))
}

type FrameStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = std::io::Result<Frame<Bytes>>> + Send>>;

/// A stream of body frames reading `file` to its end.
fn file_frames(file: tokio::fs::File) -> FrameStream {
    stream::unfold(Some(file), |state| async move {
        let mut file = state?;
        let mut buf = vec![0u8; 256 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Frame::data(Bytes::from(buf))), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
    .boxed()
}

fn bytes_frames(b: Bytes) -> FrameStream {
    stream::iter([Ok(Frame::data(b))]).boxed()
}

impl Client {
    /// All images in the local store.
    pub async fn list_images(&self) -> Result<Vec<Image>> {
        self.transport()
            .json::<()>(Method::GET, "/1.0/images?recursion=1", None)
            .await?
            .into_sync("list images")
    }

    /// One image by fingerprint.
    pub async fn image(&self, fingerprint: &str) -> Result<Image> {
        let path = format!("/1.0/images/{}", percent_encode(fingerprint));
        self.transport()
            .json::<()>(Method::GET, &path, None)
            .await?
            .into_sync(&path)
    }

    /// Deletes an image by fingerprint.
    pub async fn delete_image(&self, fingerprint: &str) -> Result<()> {
        let path = format!("/1.0/images/{}", percent_encode(fingerprint));
        let answer = self
            .transport()
            .json::<()>(Method::DELETE, &path, None)
            .await?;
        self.complete(
            answer,
            self.op_timeout(),
            &format!("image \"{fingerprint}\""),
        )
        .await?;
        Ok(())
    }

    /// Imports an image from tarballs and returns its fingerprint. Importing
    /// an image that is already in the store fails with
    /// [`Error::Conflict`].
    pub async fn import_image(&self, tarballs: ImageTarballs<'_>) -> Result<String> {
        let mut headers = HeaderMap::new();
        let body: ReqBody = match tarballs {
            ImageTarballs::Unified(path) => {
                let (f, len) = open(path).await?;
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
                BodyExt::boxed_unsync(StreamBody::new(file_frames(f)))
            }
            ImageTarballs::Split { metadata, rootfs } => {
                let (mf, mlen) = open(metadata).await?;
                let (rf, rlen) = open(rootfs).await?;
                let boundary = format!("sandboxd-{:016x}", rand_u64());
                let part = |field: &str, file: &str| {
                    Bytes::from(format!(
                        "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; \
                         filename=\"{file}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                    ))
                };
                let head = part("metadata", "metadata.tar.gz");
                let mid = {
                    let mut v = b"\r\n".to_vec();
                    v.extend_from_slice(&part("rootfs", "rootfs.tar.gz"));
                    Bytes::from(v)
                };
                let tail = Bytes::from(format!("\r\n--{boundary}--\r\n"));
                let total = head.len() as u64 + mlen + mid.len() as u64 + rlen + tail.len() as u64;
                let ct =
                    HeaderValue::from_str(&format!("multipart/form-data; boundary={boundary}"))
                        .map_err(|e| Error::InvalidArgument(format!("bad boundary: {e}")))?;
                headers.insert(http::header::CONTENT_TYPE, ct);
                headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(total));
                let frames = bytes_frames(head)
                    .chain(file_frames(mf))
                    .chain(bytes_frames(mid))
                    .chain(file_frames(rf))
                    .chain(bytes_frames(tail));
                BodyExt::boxed_unsync(StreamBody::new(frames))
            }
        };
        let path = "/1.0/images";
        // Uploads of big tarballs take a while: use the operation bound.
        let (status, raw) = self
            .transport()
            .raw(Method::POST, path, headers, body, Some(self.op_timeout()))
            .await?;
        let op = decode_envelope(&Method::POST, path, status, &raw.body)?.into_operation(path)?;
        let done = self.wait_success(&op, self.op_timeout(), "image").await?;
        done.metadata
            .as_ref()
            .and_then(|m| m.get("fingerprint"))
            .and_then(|f| f.as_str())
            .map(str::to_string)
            .ok_or_else(|| Error::protocol("image import", "no fingerprint in the result"))
    }

    /// Publishes a stopped instance (or `instance/snapshot`) as a local
    /// image with `properties` and, when given, points `alias` at it
    /// (moving the alias if it exists). Returns the new fingerprint.
    ///
    /// `compression` is passed to Incus as is (`none`, `zstd`, `gzip`...);
    /// a fast algorithm matters on small machines, where gzip of a
    /// provisioned root filesystem takes minutes.
    pub async fn publish_instance(
        &self,
        source: &str,
        alias: Option<&str>,
        properties: &std::collections::BTreeMap<String, String>,
        compression: &str,
    ) -> Result<String> {
        let kind = if source.contains('/') {
            "snapshot"
        } else {
            "instance"
        };
        let body = json!({
            "source": {"type": kind, "name": source},
            "properties": properties,
            "compression_algorithm": compression,
            "public": false,
        });
        let path = "/1.0/images";
        let answer = self
            .transport()
            .json(Method::POST, path, Some(&body))
            .await?;
        let done = self
            .complete(answer, self.op_timeout(), &format!("publishing {source}"))
            .await?;
        let fingerprint = done
            .as_ref()
            .and_then(|op| op.metadata.as_ref())
            .and_then(|m| m.get("fingerprint"))
            .and_then(|f| f.as_str())
            .map(str::to_string)
            .ok_or_else(|| Error::protocol("image publish", "no fingerprint in the result"))?;
        if let Some(alias) = alias {
            match self.image_alias(alias).await {
                Ok(_) => self.delete_image_alias(alias).await?,
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
            self.create_image_alias(alias, &fingerprint, &format!("published from {source}"))
                .await?;
        }
        Ok(fingerprint)
    }

    /// All image aliases.
    pub async fn list_image_aliases(&self) -> Result<Vec<ImageAlias>> {
        self.transport()
            .json::<()>(Method::GET, "/1.0/images/aliases?recursion=1", None)
            .await?
            .into_sync("list image aliases")
    }

    /// One alias. Errors with [`Error::NotFound`] when it does not exist.
    pub async fn image_alias(&self, alias: &str) -> Result<ImageAlias> {
        let path = alias_path(alias);
        self.transport()
            .json::<()>(Method::GET, &path, None)
            .await?
            .into_sync(&path)
    }

    /// Points a new alias at an image. Errors with [`Error::Conflict`] when
    /// the alias exists.
    pub async fn create_image_alias(
        &self,
        alias: &str,
        fingerprint: &str,
        description: &str,
    ) -> Result<()> {
        let body = json!({"name": alias, "target": fingerprint, "description": description});
        match self
            .transport()
            .json(Method::POST, "/1.0/images/aliases", Some(&body))
            .await
        {
            Ok(_) => Ok(()),
            Err(Error::Api { message, .. }) if message.contains("already exists") => {
                Err(Error::Conflict {
                    what: format!("image alias \"{alias}\""),
                    message,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes an alias (the image stays).
    pub async fn delete_image_alias(&self, alias: &str) -> Result<()> {
        let path = alias_path(alias);
        self.transport()
            .json::<()>(Method::DELETE, &path, None)
            .await?;
        Ok(())
    }
}

/// A random value for multipart boundaries (no crypto need: it only has
/// to be absent from the payload, which random bits make overwhelmingly
/// likely).
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}
