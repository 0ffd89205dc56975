//! An S3-compatible object store (`s3://BUCKET/PREFIX`), configured as the AWS tools are:
//! `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (or `~/.aws/credentials`, profile
//! `AWS_PROFILE` or `default`), `AWS_REGION` / `AWS_DEFAULT_REGION`, and
//! `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` for stores other than AWS (path-style URLs).
//!
//! Requests are signed by `rusty-s3` (Sans-IO, SigV4 presigned URLs) and sent by `ureq`
//! (blocking, rustls): small, synchronous like the rest of encimg. Failures that may pass
//! (connection errors, 5xx, throttling) are retried with backoff within twice `--kms-timeout`
//! (a try that timed out is not made again); the rest are one clear line each (wrong
//! credentials, missing bucket, clock skew).

use std::io::Read;
use std::time::{Duration, Instant};

use rusty_s3::actions::{ListObjectsV2, S3Action};
use rusty_s3::{Bucket, Credentials, UrlStyle};

use crate::err;
use crate::error::{Error, Result};

/// How long a signed URL lives (requests are sent at once).
const SIGN_FOR: Duration = Duration::from_secs(600);
/// Tries of a request that failed in a way that may pass.
const TRIES: u32 = 4;

/// `s3://BUCKET/PREFIX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    pub prefix: String,
}

impl S3Url {
    pub fn parse(s: &str) -> Result<S3Url> {
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| err!(InvalidInput, "'{s}' is not an s3://BUCKET/PREFIX URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.');
        if !ok {
            return Err(err!(InvalidInput, "'{bucket}' is not an S3 bucket name"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == ".." || p == ".") {
            return Err(err!(InvalidInput, "'{s}': a prefix of . or .. parts"));
        }
        Ok(S3Url {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    pub fn uri(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// A bucket and prefix, with credentials from the environment.
pub struct ObjStore {
    pub url: S3Url,
    bucket: Bucket,
    creds: Credentials,
    agent: ureq::Agent,
    /// Bound of each wait in one request (`--kms-timeout`). A try that timed out is not made
    /// again, so a hung server fails a request in about this; quick failures (refused
    /// connections, 5xx, throttling) are tried again while the request has been going for
    /// less than twice this.
    timeout: Duration,
}

impl std::fmt::Debug for ObjStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjStore({})", self.url.uri())
    }
}

/// `~/.aws/credentials` or `~/.aws/config` value of `key` in the profile in use.
fn aws_file(file: &str, key: &str) -> Option<String> {
    let home = std::env::var_os("HOME")?;
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let text = std::fs::read_to_string(std::path::Path::new(&home).join(".aws").join(file)).ok()?;
    let mut inside = false;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            let name = l.trim_matches(['[', ']']).trim();
            inside = name == profile || name == format!("profile {profile}");
        } else if inside {
            if let Some((k, v)) = l.split_once('=') {
                if k.trim() == key {
                    return Some(v.trim().to_string());
                }
            }
        }
    }
    None
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// The S3 endpoint the environment names (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`), for
/// stores other than AWS; a region records it when added.
pub fn named_endpoint() -> Option<String> {
    env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL"))
}

/// Whether a request failed because a wait ran out (rather than being refused or cut).
fn is_timeout(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Timeout(_) => true,
        ureq::Error::Io(io) => io_timed_out(io),
        _ => false,
    }
}

/// [`is_timeout`] of a body read's error (ureq's own, wrapped, or the socket's).
fn io_timed_out(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::TimedOut
        || e.get_ref()
            .and_then(|i| i.downcast_ref::<ureq::Error>())
            .is_some_and(is_timeout)
}

/// An HTTP agent whose every wait is bounded by `timeout`.
fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(timeout))
        .timeout_send_request(Some(timeout))
        // A server that stops reading (stopped, hung) stalls a PUT's body once the
        // socket's buffer is full: each write must make progress within the timeout.
        .timeout_per_write(Some(timeout))
        .timeout_recv_response(Some(timeout))
        .timeout_recv_body(Some(timeout * 4))
        .build()
        .into()
}

/// What a region records as its endpoint when the environment names none: AWS's own.
pub const AWS: &str = "aws";

/// The endpoint a region is recorded at, as a region records it when added.
pub fn endpoint_to_record() -> String {
    named_endpoint().unwrap_or_else(|| AWS.to_string())
}

fn same_endpoint(a: &str, b: &str) -> bool {
    a.trim_end_matches('/')
        .eq_ignore_ascii_case(b.trim_end_matches('/'))
}

/// Whether two regions' endpoints may be one place (an unknown one may be any).
pub fn may_be_same_endpoint(a: Option<&str>, b: Option<&str>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => same_endpoint(a, b),
        _ => true,
    }
}

/// The endpoint to use for a region `recorded` at one (None: a record from before it was
/// kept, which takes the environment's), with the environment naming `named`: the region's
/// own, and never another (the same bucket name there is another place, whose emptiness
/// would read as the region's). None: AWS's own.
fn choose_endpoint(
    url: &S3Url,
    recorded: Option<&str>,
    named: Option<String>,
) -> Result<Option<String>> {
    match (recorded, named) {
        (None, named) => Ok(named),
        (Some(want), Some(now)) if !same_endpoint(want, &now) => Err(err!(
            InvalidInput,
            "{} is at {}, but AWS_ENDPOINT_URL names {now}: unset it, or set it to the region's",
            url.uri(),
            if want == AWS { "AWS" } else { want }
        )),
        (Some(want), _) if want == AWS => Ok(None),
        (Some(want), _) => Ok(Some(want.to_string())),
    }
}

fn aws_region() -> String {
    env("AWS_REGION")
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .or_else(|| aws_file("config", "region"))
        .unwrap_or_else(|| "us-east-1".into())
}

impl ObjStore {
    /// The bucket of `url` at `endpoint` (a region's recorded one; None: the environment's).
    /// An environment naming another endpoint than the region's is refused: the same
    /// bucket name there is another place, whose emptiness would read as the region's.
    /// With no endpoint in the environment, the region's is used.
    pub fn open_at(url: &S3Url, endpoint: Option<&str>) -> Result<ObjStore> {
        Self::open_endpoint(url, choose_endpoint(url, endpoint, named_endpoint())?)
    }

    pub fn open(url: &S3Url) -> Result<ObjStore> {
        Self::open_endpoint(url, named_endpoint())
    }

    /// At `endpoint` (path-style URLs), else AWS's for the configured region.
    fn open_endpoint(url: &S3Url, endpoint: Option<String>) -> Result<ObjStore> {
        let key = env("AWS_ACCESS_KEY_ID").or_else(|| aws_file("credentials", "aws_access_key_id"));
        let secret = env("AWS_SECRET_ACCESS_KEY")
            .or_else(|| aws_file("credentials", "aws_secret_access_key"));
        let (Some(key), Some(secret)) = (key, secret) else {
            return Err(err!(
                InvalidInput,
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or write them in ~/.aws/credentials"
            ));
        };
        let creds = match env("AWS_SESSION_TOKEN") {
            Some(t) => Credentials::new_with_token(key, secret, t),
            None => Credentials::new(key, secret),
        };
        let region = aws_region();
        let (endpoint, style) = match endpoint {
            Some(e) => (e, UrlStyle::Path),
            None => (
                format!("https://s3.{region}.amazonaws.com"),
                UrlStyle::VirtualHost,
            ),
        };
        let endpoint = endpoint
            .parse()
            .map_err(|e| err!(InvalidInput, "S3 endpoint '{endpoint}': {e}"))?;
        let bucket = Bucket::new(endpoint, style, url.bucket.clone(), region)
            .map_err(|e| err!(InvalidInput, "S3 bucket {}: {e}", url.bucket))?;
        let timeout = crate::kms::service::timeout().max(Duration::from_secs(1));
        Ok(ObjStore {
            url: url.clone(),
            bucket,
            creds,
            agent: agent(timeout),
            timeout,
        })
    }

    /// The same bucket through connections of its own: the key store's few small requests
    /// then never sit on a connection a resource's next request takes (some servers, s3s-fs
    /// among them, hold a small reply on a kept connection until the client's delayed ACK,
    /// 40 ms, which the first request of a mount would otherwise pay).
    pub fn apart(&self) -> ObjStore {
        ObjStore {
            url: self.url.clone(),
            bucket: self.bucket.clone(),
            creds: self.creds.clone(),
            agent: agent(self.timeout),
            timeout: self.timeout,
        }
    }

    /// The full object key of `rel` under the prefix.
    pub fn key(&self, rel: &str) -> String {
        if self.url.prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.url.prefix)
        }
    }

    /// `s3://BUCKET/PREFIX/rel`.
    pub fn uri_of(&self, rel: &str) -> String {
        format!("s3://{}/{}", self.url.bucket, self.key(rel))
    }

    fn name(&self) -> String {
        format!("S3 {}", self.url.uri())
    }

    /// Run `req` with retries and backoff for what may pass; map the rest to one line.
    fn send(
        &self,
        what: &str,
        req: &dyn Fn() -> std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Option<Vec<u8>>> {
        Ok(self.send_tagged(what, req, 1 << 30)?.map(|(body, _)| body))
    }

    /// [`send`](Self::send), with the reply's ETag; a body over `max` bytes is refused.
    fn send_tagged(
        &self,
        what: &str,
        req: &dyn Fn() -> std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
        max: u64,
    ) -> Result<Option<(Vec<u8>, Option<String>)>> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut last = String::new();
        let mut tries = 0;
        // A try that timed out is not made again: the server is hung, and one more wait of
        // the same length would double the bound. Quick failures (refused, 5xx, throttling)
        // are tried again within twice the timeout.
        let mut timed_out = false;
        while tries < TRIES {
            if tries > 0 {
                if timed_out || start.elapsed() + delay > self.timeout * 2 {
                    break;
                }
                std::thread::sleep(delay);
                delay *= 2;
            }
            tries += 1;
            let resp = match req() {
                Ok(r) => r,
                Err(e) => {
                    timed_out = is_timeout(&e);
                    last = e.to_string();
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let etag = resp
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let size = resp
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
                .unwrap_or(0);
            let mut body = Vec::with_capacity(size.min(64 << 20));
            let read = resp
                .into_body()
                .into_reader()
                .take(max + 1)
                .read_to_end(&mut body);
            if let Err(e) = read {
                timed_out = io_timed_out(&e);
                last = e.to_string();
                continue;
            }
            if body.len() as u64 > max {
                return Err(err!(
                    Corrupt,
                    "{}: {what}: the object is larger than {max} bytes",
                    self.name()
                ));
            }
            tracing::debug!(
                "{what}: HTTP {status}, {} bytes in {:?}",
                body.len(),
                start.elapsed()
            );
            match status {
                200..=299 => return Ok(Some((body, etag))),
                404 if !String::from_utf8_lossy(&body).contains("NoSuchBucket") => return Ok(None),
                500..=599 | 429 => {
                    last = format!("HTTP {status}");
                    continue;
                }
                _ => return Err(self.refusal(what, status, &body)),
            }
        }
        Err(err!(
            Io,
            "{} is unreachable for {what}: {last} ({tries} {} in {:.1} s)",
            self.name(),
            if tries == 1 { "try" } else { "tries" },
            start.elapsed().as_secs_f64()
        ))
    }

    fn refusal(&self, what: &str, status: u16, body: &[u8]) -> Error {
        let text = String::from_utf8_lossy(body);
        let code = text
            .split("<Code>")
            .nth(1)
            .and_then(|c| c.split("</Code>").next())
            .unwrap_or("")
            .to_string();
        match code.as_str() {
            "NoSuchBucket" => err!(
                NotFound,
                "{}: bucket {} does not exist",
                self.name(),
                self.url.bucket
            ),
            "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AccessDenied" => err!(
                Denied,
                "{}: the credentials are refused for {what} ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
                self.name()
            ),
            // A conditional PUT whose condition no longer holds: someone else wrote first.
            "PreconditionFailed" => err!(
                Busy,
                "{}: {what}: the object changed meanwhile (another writer)",
                self.name()
            ),
            "RequestTimeTooSkewed" => err!(
                Io,
                "{}: this host's clock is too far from the store's (RequestTimeTooSkewed): fix the time (timedatectl)",
                self.name()
            ),
            _ => err!(Io, "{}: {what} failed: HTTP {status} {code}", self.name()),
        }
    }

    /// The object, or None if it does not exist.
    pub fn get(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.get_tagged(rel, 1 << 30)?.map(|(body, _)| body))
    }

    /// `len` bytes of the object from `off` (fewer at its end).
    pub fn get_range(&self, rel: &str, off: u64, len: u64) -> Result<Option<Vec<u8>>> {
        let key = self.key(rel);
        let url = self
            .bucket
            .get_object(Some(&self.creds), &key)
            .sign(SIGN_FOR);
        let range = format!("bytes={off}-{}", off + len - 1);
        self.send(&format!("GET {key} {range}"), &|| {
            self.agent.get(url.as_str()).header("Range", &range).call()
        })
    }

    pub fn put(&self, rel: &str, data: &[u8]) -> Result<()> {
        let key = self.key(rel);
        let url = self
            .bucket
            .put_object(Some(&self.creds), &key)
            .sign(SIGN_FOR);
        self.send(&format!("PUT {key}"), &|| {
            self.agent.put(url.as_str()).send(data)
        })?
        .ok_or_else(|| err!(Io, "{}: PUT {key}: not found", self.name()))?;
        Ok(())
    }

    /// The object and its ETag, or None if it does not exist; one over `max` bytes is
    /// refused.
    pub fn get_tagged(&self, rel: &str, max: u64) -> Result<Option<(Vec<u8>, Option<String>)>> {
        let key = self.key(rel);
        let url = self
            .bucket
            .get_object(Some(&self.creds), &key)
            .sign(SIGN_FOR);
        self.send_tagged(
            &format!("GET {key}"),
            &|| self.agent.get(url.as_str()).call(),
            max,
        )
    }

    /// PUT only if the object is still the one `etag` names (None: only if there is none),
    /// as AWS, Ceph RGW and MinIO do it (`If-Match`, `If-None-Match: *`). Someone else's
    /// write in between is Busy. A retry after a reply lost on the way back finds its own
    /// bytes in place: that counts as done.
    pub fn put_if(&self, rel: &str, data: &[u8], etag: Option<&str>) -> Result<()> {
        let key = self.key(rel);
        let url = self
            .bucket
            .put_object(Some(&self.creds), &key)
            .sign(SIGN_FOR);
        let (name, value) = match etag {
            Some(t) => ("If-Match", t.to_string()),
            None => ("If-None-Match", "*".to_string()),
        };
        let sent = self.send(&format!("PUT {key}"), &|| {
            self.agent
                .put(url.as_str())
                .header(name, value.as_str())
                .send(data)
        });
        match sent {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(err!(Io, "{}: PUT {key}: not found", self.name())),
            Err(e) if e.kind == crate::error::ErrorKind::Busy => match self.get(rel)? {
                Some(now) if now == data => Ok(()),
                _ => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    pub fn delete(&self, rel: &str) -> Result<()> {
        let key = self.key(rel);
        let url = self
            .bucket
            .delete_object(Some(&self.creds), &key)
            .sign(SIGN_FOR);
        self.send(&format!("DELETE {key}"), &|| {
            self.agent.delete(url.as_str()).call()
        })?;
        Ok(())
    }

    /// Every object under `rel_prefix` (relative keys, sizes), in key order.
    pub fn list(&self, rel_prefix: &str) -> Result<Vec<(String, u64)>> {
        let full = self.key(rel_prefix);
        let strip = self.key("");
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut action = self.bucket.list_objects_v2(Some(&self.creds));
            action.with_prefix(full.as_str());
            if let Some(t) = &token {
                action.with_continuation_token(t.as_str());
            }
            let url = action.sign(SIGN_FOR);
            let body = self
                .send(&format!("LIST {full}"), &|| {
                    self.agent.get(url.as_str()).call()
                })?
                .ok_or_else(|| err!(NotFound, "{}: nothing to list", self.name()))?;
            let text = String::from_utf8_lossy(&body);
            let parsed = ListObjectsV2::parse_response(&text)
                .map_err(|e| err!(Io, "{}: a malformed listing: {e}", self.name()))?;
            for c in parsed.contents {
                let rel = c.key.strip_prefix(&strip).unwrap_or(&c.key).to_string();
                out.push((rel, c.size.unwrap_or(0)));
            }
            match parsed.next_continuation_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_uses_the_endpoint_it_was_added_at_and_no_other() {
        let u = S3Url::parse("s3://bkt/p").unwrap();
        let at = |rec: Option<&str>, env: Option<&str>| {
            choose_endpoint(&u, rec, env.map(str::to_string))
        };
        let minio = "http://127.0.0.1:9000";
        assert_eq!(at(Some(minio), None).unwrap().as_deref(), Some(minio));
        assert_eq!(
            at(Some(minio), Some("http://127.0.0.1:9000/"))
                .unwrap()
                .as_deref(),
            Some(minio)
        );
        assert!(at(Some(minio), Some("http://127.0.0.1:9")).is_err());
        // Added against AWS: AWS's, and an endpoint in the environment is another place.
        assert_eq!(at(Some(AWS), None).unwrap(), None);
        let e = at(Some(AWS), Some(minio)).unwrap_err();
        assert!(e.message.contains("is at AWS"), "{}", e.message);
        // A record from before endpoints were kept takes the environment's.
        assert_eq!(at(None, Some(minio)).unwrap().as_deref(), Some(minio));
        assert_eq!(at(None, None).unwrap(), None);
        assert!(may_be_same_endpoint(None, Some(minio)));
        assert!(may_be_same_endpoint(
            Some("HTTP://127.0.0.1:9000/"),
            Some(minio)
        ));
        assert!(!may_be_same_endpoint(Some(AWS), Some(minio)));
    }

    #[test]
    fn parses_s3_urls() {
        let u = S3Url::parse("s3://images-1/team/a").unwrap();
        assert_eq!(
            (u.bucket.as_str(), u.prefix.as_str()),
            ("images-1", "team/a")
        );
        assert_eq!(u.uri(), "s3://images-1/team/a");
        assert_eq!(S3Url::parse("s3://bkt").unwrap().prefix, "");
        for bad in [
            "s3://",
            "s3://A_B/x",
            "http://b/x",
            "s3://bkt/../x",
            "s3://ab",
        ] {
            assert!(S3Url::parse(bad).is_err(), "{bad}");
        }
    }
}
