//! A KMIP 1.4 client over TLS with a client certificate (`kmip://HOST:PORT?ca=&cert=&key=`):
//! the operations a key service needs (Create, Register, Activate, Get Attributes (State),
//! Revoke, Destroy, Encrypt and Decrypt with AES-GCM). Messages are TTLV trees
//! ([`super::ttlv`]); TLS is rustls with the ring provider.
//!
//! One connection is kept and reused; every connect, write and read is bounded by the
//! timeout ([`super::timeout`]), and a request that fails on a connection the server had
//! already closed is sent once more on a new one.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use zeroize::Zeroizing;

use super::ttlv::{self, Item, Value};
use super::ServiceState;
use crate::err;
use crate::error::{Error, Result};
use crate::kms::KeySpec;

mod tag {
    pub const ATTRIBUTE: u32 = 0x420008;
    pub const ATTRIBUTE_NAME: u32 = 0x42000A;
    pub const ATTRIBUTE_VALUE: u32 = 0x42000B;
    pub const BATCH_COUNT: u32 = 0x42000D;
    pub const BATCH_ITEM: u32 = 0x42000F;
    pub const BLOCK_CIPHER_MODE: u32 = 0x420011;
    pub const CRYPTOGRAPHIC_ALGORITHM: u32 = 0x420028;
    pub const CRYPTOGRAPHIC_LENGTH: u32 = 0x42002A;
    pub const CRYPTOGRAPHIC_PARAMETERS: u32 = 0x42002B;
    pub const IV_COUNTER_NONCE: u32 = 0x42003D;
    pub const KEY_BLOCK: u32 = 0x420040;
    pub const KEY_FORMAT_TYPE: u32 = 0x420042;
    pub const KEY_MATERIAL: u32 = 0x420043;
    pub const KEY_VALUE: u32 = 0x420045;
    pub const NAME_TYPE: u32 = 0x420054;
    pub const NAME_VALUE: u32 = 0x420055;
    pub const OBJECT_TYPE: u32 = 0x420057;
    pub const OPERATION: u32 = 0x42005C;
    pub const PROTOCOL_VERSION: u32 = 0x420069;
    pub const PROTOCOL_VERSION_MAJOR: u32 = 0x42006A;
    pub const PROTOCOL_VERSION_MINOR: u32 = 0x42006B;
    pub const REQUEST_HEADER: u32 = 0x420077;
    pub const REQUEST_MESSAGE: u32 = 0x420078;
    pub const REQUEST_PAYLOAD: u32 = 0x420079;
    pub const RESPONSE_MESSAGE: u32 = 0x42007B;
    pub const RESPONSE_PAYLOAD: u32 = 0x42007C;
    pub const RESULT_MESSAGE: u32 = 0x42007D;
    pub const RESULT_REASON: u32 = 0x42007E;
    pub const RESULT_STATUS: u32 = 0x42007F;
    pub const REVOCATION_REASON: u32 = 0x420081;
    pub const REVOCATION_REASON_CODE: u32 = 0x420082;
    pub const SYMMETRIC_KEY: u32 = 0x42008F;
    pub const TEMPLATE_ATTRIBUTE: u32 = 0x420091;
    pub const UNIQUE_IDENTIFIER: u32 = 0x420094;
    pub const DATA: u32 = 0x4200C2;
    pub const TAG_LENGTH: u32 = 0x4200CE;
    pub const AEAD_ADDITIONAL_DATA: u32 = 0x4200FE;
    pub const AEAD_TAG: u32 = 0x4200FF;
}

mod op {
    pub const CREATE: u32 = 0x01;
    pub const REGISTER: u32 = 0x03;
    pub const GET_ATTRIBUTES: u32 = 0x0B;
    pub const ACTIVATE: u32 = 0x12;
    pub const REVOKE: u32 = 0x13;
    pub const DESTROY: u32 = 0x14;
    pub const ENCRYPT: u32 = 0x1F;
    pub const DECRYPT: u32 = 0x20;

    pub fn name(op: u32) -> &'static str {
        match op {
            CREATE => "Create",
            REGISTER => "Register",
            GET_ATTRIBUTES => "Get Attributes",
            ACTIVATE => "Activate",
            REVOKE => "Revoke",
            DESTROY => "Destroy",
            ENCRYPT => "Encrypt",
            DECRYPT => "Decrypt",
            _ => "?",
        }
    }
}

const OBJECT_SYMMETRIC_KEY: u32 = 2;
const ALG_AES: u32 = 3;
const ALG_SM4: u32 = 0x2D;
const MODE_GCM: u32 = 9;
const USAGE_ENCRYPT_DECRYPT: i32 = 0x4 | 0x8;
const KEY_FORMAT_RAW: u32 = 1;
const NAME_TYPE_TEXT: u32 = 1;
const REVOKE_CESSATION_OF_OPERATION: u32 = 6;
/// Result Reason "Item Not Found" and "Permission Denied".
const REASON_NOT_FOUND: u32 = 1;
const REASON_PERMISSION_DENIED: u32 = 0x0C;
/// The largest response accepted.
const MAX_MESSAGE: usize = 1 << 20;

/// Where the server is and the files that authenticate us to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KmipUri {
    pub host: String,
    pub port: u16,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl KmipUri {
    /// Parse `kmip://HOST:PORT?ca=FILE&cert=FILE&key=FILE`.
    pub fn parse(s: &str) -> Result<KmipUri> {
        let usage = "kmip://HOST:PORT?ca=FILE&cert=FILE&key=FILE";
        let rest = s
            .strip_prefix("kmip://")
            .ok_or_else(|| err!(InvalidInput, "a KMIP URI starts with kmip:// ({usage})"))?;
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| err!(InvalidInput, "{s}: no port ({usage})"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port
            .parse()
            .map_err(|_| err!(InvalidInput, "{s}: bad port '{port}'"))?;
        if host.is_empty() {
            return Err(err!(InvalidInput, "{s}: no host ({usage})"));
        }
        let (mut ca, mut cert, mut key) = (None, None, None);
        for kv in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = PathBuf::from(super::percent_decode(v)?);
            match k {
                "ca" => ca = Some(v),
                "cert" => cert = Some(v),
                "key" => key = Some(v),
                _ => return Err(err!(InvalidInput, "{s}: unknown parameter '{k}' ({usage})")),
            }
        }
        let need = |v: Option<PathBuf>, what: &str| {
            v.filter(|p| !p.as_os_str().is_empty()).ok_or_else(|| {
                err!(
                    InvalidInput,
                    "{s}: '{what}=FILE' is missing ({usage}); credentials come only from files"
                )
            })
        };
        Ok(KmipUri {
            host: host.to_string(),
            port,
            ca: need(ca, "ca")?,
            cert: need(cert, "cert")?,
            key: need(key, "key")?,
        })
    }

    pub fn uri(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!(
            "kmip://{host}:{}?ca={}&cert={}&key={}",
            self.port,
            self.ca.display(),
            self.cert.display(),
            self.key.display()
        )
    }
}

/// Time left before `deadline`, if any.
fn remaining(deadline: Instant) -> Option<std::time::Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// An error that means the server closed a kept connection before reading the request.
fn is_stale(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

/// A KMIP server.
#[derive(Debug)]
pub struct Kmip {
    uri: KmipUri,
    conn: Mutex<Option<Box<Conn>>>,
}

struct Conn(StreamOwned<ClientConnection, TcpStream>);

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Conn")
    }
}

impl Kmip {
    pub fn new(uri: KmipUri) -> Kmip {
        Kmip {
            uri,
            conn: Mutex::new(None),
        }
    }

    /// How messages name this service.
    pub fn name(&self) -> String {
        format!("KMIP server {}:{}", self.uri.host, self.uri.port)
    }

    pub fn uri(&self) -> String {
        self.uri.uri()
    }

    fn unreachable(&self, what: impl std::fmt::Display) -> Error {
        err!(
            KeyUnusable,
            "{} {} {what} (waited at most {:.1} s; --kms-timeout)",
            self.name(),
            super::UNREACHABLE,
            super::timeout().as_secs_f64()
        )
    }

    fn tls_config(&self) -> Result<Arc<ClientConfig>> {
        let u = &self.uri;
        let read = |p: &PathBuf, what: &str| {
            crate::sys::read_regular(p, 1 << 20)
                .map(Zeroizing::new)
                .map_err(|e| e.context(format!("{} {what} file", self.name())))
        };
        let bad = |p: &PathBuf, what: &str| {
            err!(
                InvalidInput,
                "{}: {} holds no PEM {what}",
                self.name(),
                p.display()
            )
        };
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&read(&u.ca, "CA")?) {
            let c = c.map_err(|_| bad(&u.ca, "certificate"))?;
            roots.add(c).map_err(|e| {
                err!(
                    InvalidInput,
                    "{}: CA certificate in {}: {e}",
                    self.name(),
                    u.ca.display()
                )
            })?;
        }
        if roots.is_empty() {
            return Err(bad(&u.ca, "certificate"));
        }
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read(&u.cert, "client certificate")?)
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| bad(&u.cert, "certificate"))?;
        if chain.is_empty() {
            return Err(bad(&u.cert, "certificate"));
        }
        let key = PrivateKeyDer::from_pem_slice(&read(&u.key, "client key")?)
            .map_err(|_| bad(&u.key, "private key"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| err!(Io, "TLS: {e}"))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| {
                err!(
                    InvalidInput,
                    "{}: the client certificate and key do not go together: {e}",
                    self.name()
                )
            })?;
        Ok(Arc::new(cfg))
    }

    fn connect(&self, deadline: Instant) -> Result<Conn> {
        let cfg = self.tls_config()?;
        let t = remaining(deadline).ok_or_else(|| self.unreachable("no time left"))?;
        let addrs: Vec<_> = (self.uri.host.as_str(), self.uri.port)
            .to_socket_addrs()
            .map_err(|e| self.unreachable(format!("cannot resolve {}: {e}", self.uri.host)))?
            .collect();
        let mut last = None;
        let mut tcp = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, t) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = tcp.ok_or_else(|| {
            self.unreachable(last.map_or("no address".to_string(), |e| e.to_string()))
        })?;
        tcp.set_read_timeout(Some(t)).ok();
        tcp.set_write_timeout(Some(t)).ok();
        tcp.set_nodelay(true).ok();
        let name = ServerName::try_from(self.uri.host.clone())
            .map_err(|e| err!(InvalidInput, "{}: bad host name: {e}", self.name()))?;
        let mut conn = ClientConnection::new(cfg, name).map_err(|e| err!(Io, "TLS: {e}"))?;
        let mut tcp = tcp;
        // The handshake by hand, one read at a time, so the deadline holds however slowly
        // the server answers.
        let timed_out = || self.unreachable("no TLS handshake in time");
        while conn.is_handshaking() {
            while conn.wants_write() {
                let left = remaining(deadline).ok_or_else(timed_out)?;
                tcp.set_write_timeout(Some(left)).ok();
                conn.write_tls(&mut tcp)
                    .map_err(|e| self.unreachable(format!("TLS handshake: {e}")))?;
            }
            if !conn.is_handshaking() {
                break;
            }
            let left = remaining(deadline).ok_or_else(timed_out)?;
            tcp.set_read_timeout(Some(left)).ok();
            match conn.read_tls(&mut tcp) {
                Ok(0) => return Err(self.unreachable("the server closed the TLS handshake")),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(timed_out())
                }
                Err(e) => return Err(self.unreachable(format!("TLS handshake: {e}"))),
            }
            if let Err(e) = conn.process_new_packets() {
                // Tell the server why, then fail.
                let _ = conn.write_tls(&mut tcp);
                return Err(err!(
                    KeyUnusable,
                    "{}: TLS handshake failed: {e} (check ca=, cert= and key=)",
                    self.name()
                ));
            }
        }
        Ok(Conn(StreamOwned::new(conn, tcp)))
    }

    /// Send one request and return its response payload, or the server's refusal.
    fn call(&self, operation: u32, payload: Vec<Item>) -> Result<Item> {
        self.call_raw(operation, payload)?
            .map_err(|(reason, text)| match reason {
                Some(REASON_NOT_FOUND) | Some(REASON_PERMISSION_DENIED) => {
                    err!(KeyUnusable, "{text}")
                }
                _ => err!(Refused, "{text}"),
            })
    }

    /// Send one request: Err for a transport failure, Ok(Err((reason, message))) when the
    /// server refused the operation.
    #[allow(clippy::type_complexity)]
    fn call_raw(
        &self,
        operation: u32,
        payload: Vec<Item>,
    ) -> Result<std::result::Result<Item, (Option<u32>, String)>> {
        let request = ttlv::structure(
            tag::REQUEST_MESSAGE,
            vec![
                ttlv::structure(
                    tag::REQUEST_HEADER,
                    vec![
                        ttlv::structure(
                            tag::PROTOCOL_VERSION,
                            vec![
                                ttlv::integer(tag::PROTOCOL_VERSION_MAJOR, 1),
                                ttlv::integer(tag::PROTOCOL_VERSION_MINOR, 4),
                            ],
                        ),
                        ttlv::integer(tag::BATCH_COUNT, 1),
                    ],
                ),
                ttlv::structure(
                    tag::BATCH_ITEM,
                    vec![
                        ttlv::enumeration(tag::OPERATION, operation),
                        ttlv::structure(tag::REQUEST_PAYLOAD, payload),
                    ],
                ),
            ],
        );
        let bytes = Zeroizing::new(request.encode());
        // One deadline for the whole call: connecting, the handshake, every write and read.
        let deadline = Instant::now() + super::timeout();
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let reused = slot.is_some();
        let response = match self.exchange(&mut slot, &bytes, deadline) {
            Ok(r) => r,
            // The server closed an idle kept connection before reading the request (an end
            // of stream or a reset, no byte of reply): once more on a new one. Never after a
            // timeout or a partial reply, when the server may have acted on it.
            Err((e, false)) if reused && is_stale(&e) => {
                *slot = None;
                self.exchange(&mut slot, &bytes, deadline)
                    .map_err(|(e, _)| self.transport(e))?
            }
            Err((e, _)) => return Err(self.transport(e)),
        };
        drop(slot);
        let item = Item::decode(&response).map_err(|e| {
            err!(
                Corrupt,
                "{} sent a malformed response to {}: {}",
                self.name(),
                op::name(operation),
                e.0
            )
        })?;
        let batch = item
            .child(tag::BATCH_ITEM)
            .filter(|_| item.tag == tag::RESPONSE_MESSAGE)
            .ok_or_else(|| {
                err!(
                    Corrupt,
                    "{} answered {} without a batch item",
                    self.name(),
                    op::name(operation)
                )
            })?;
        let status = batch
            .child(tag::RESULT_STATUS)
            .and_then(Item::as_enum)
            .unwrap_or(1);
        if status != 0 {
            let reason = batch.child(tag::RESULT_REASON).and_then(Item::as_enum);
            let msg = batch
                .child(tag::RESULT_MESSAGE)
                .and_then(Item::as_text)
                .unwrap_or("no message");
            let text = format!("{} refused {}: {msg}", self.name(), op::name(operation));
            return Ok(Err((reason, text)));
        }
        Ok(Ok(batch
            .child(tag::RESPONSE_PAYLOAD)
            .cloned()
            .unwrap_or_else(|| {
                ttlv::structure(tag::RESPONSE_PAYLOAD, vec![])
            })))
    }

    fn transport(&self, e: std::io::Error) -> Error {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                self.unreachable("no answer in time")
            }
            // Connecting failed: its message already names the server and says why.
            std::io::ErrorKind::Other if e.to_string().starts_with(&self.name()) => {
                err!(KeyUnusable, "{e}")
            }
            _ => self.unreachable(e),
        }
    }

    /// One request and its reply on the kept connection (made if there is none). On
    /// failure the connection is dropped; the flag says whether any reply byte came.
    #[allow(clippy::type_complexity)]
    fn exchange(
        &self,
        slot: &mut Option<Box<Conn>>,
        request: &[u8],
        deadline: Instant,
    ) -> std::result::Result<Zeroizing<Vec<u8>>, (std::io::Error, bool)> {
        if slot.is_none() {
            let c = self
                .connect(deadline)
                .map_err(|e| (std::io::Error::other(e.message), true))?;
            *slot = Some(Box::new(c));
        }
        let conn = &mut slot.as_mut().unwrap().0;
        super::count_request();
        let mut got = 0usize;
        let mut read_full = |conn: &mut StreamOwned<ClientConnection, TcpStream>,
                             buf: &mut [u8]|
         -> std::io::Result<()> {
            let mut done = 0;
            while done < buf.len() {
                let left = remaining(deadline)
                    .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::TimedOut))?;
                conn.sock.set_read_timeout(Some(left))?;
                match conn.read(&mut buf[done..]) {
                    Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => {
                        done += n;
                        got += n;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        };
        let r = (|| -> std::io::Result<Zeroizing<Vec<u8>>> {
            let left = remaining(deadline)
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::TimedOut))?;
            conn.sock.set_write_timeout(Some(left))?;
            conn.write_all(request)?;
            conn.flush()?;
            let mut head = [0u8; 8];
            read_full(conn, &mut head)?;
            let len = u32::from_be_bytes(head[4..8].try_into().unwrap()) as usize;
            if len > MAX_MESSAGE {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("a {len}-byte response"),
                ));
            }
            let mut msg = Zeroizing::new(vec![0u8; 8 + len]);
            msg[..8].copy_from_slice(&head);
            read_full(conn, &mut msg[8..])?;
            Ok(msg)
        })();
        r.map_err(|e| {
            *slot = None;
            (e, got > 0)
        })
    }

    fn uid_of(&self, payload: &Item, what: u32) -> Result<String> {
        payload
            .child(tag::UNIQUE_IDENTIFIER)
            .and_then(Item::as_text)
            .map(str::to_string)
            .ok_or_else(|| {
                err!(
                    Corrupt,
                    "{} answered {} without a unique identifier",
                    self.name(),
                    op::name(what)
                )
            })
    }

    fn algorithm(&self, spec: KeySpec) -> (u32, i32) {
        match spec {
            KeySpec::Aes256 => (ALG_AES, 256),
            KeySpec::Sm4 => (ALG_SM4, 128),
        }
    }

    fn attribute(name: &str, value: Item) -> Item {
        ttlv::structure(
            tag::ATTRIBUTE,
            vec![ttlv::text(tag::ATTRIBUTE_NAME, name), value],
        )
    }

    fn name_attribute(label: &str) -> Item {
        Self::attribute(
            "Name",
            ttlv::structure(
                tag::ATTRIBUTE_VALUE,
                vec![
                    ttlv::text(tag::NAME_VALUE, label),
                    ttlv::enumeration(tag::NAME_TYPE, NAME_TYPE_TEXT),
                ],
            ),
        )
    }

    fn refuse_spec(&self, spec: KeySpec, e: Error) -> Error {
        if spec == KeySpec::Sm4 && e.kind == crate::error::ErrorKind::Refused {
            let name = self.name();
            let why = e
                .message
                .strip_prefix(&format!("{name} "))
                .unwrap_or(&e.message);
            err!(
                Refused,
                "{name} cannot hold SM4 keys (it {why}); use an AES_256 key in this region, or SM4 in a local region"
            )
        } else {
            e
        }
    }

    /// Create an Active key; returns the server's unique identifier.
    pub fn create(&self, spec: KeySpec, label: &str) -> Result<String> {
        let (alg, len) = self.algorithm(spec);
        let attrs = vec![
            Self::attribute(
                "Cryptographic Algorithm",
                ttlv::enumeration(tag::ATTRIBUTE_VALUE, alg),
            ),
            Self::attribute(
                "Cryptographic Length",
                ttlv::integer(tag::ATTRIBUTE_VALUE, len),
            ),
        ];
        self.new_key(op::CREATE, spec, label, attrs, None)
    }

    /// Create or Register (with `object`) a symmetric key usable to encrypt and decrypt,
    /// named `label`, and activate it; returns the server's unique identifier.
    fn new_key(
        &self,
        operation: u32,
        spec: KeySpec,
        label: &str,
        mut attrs: Vec<Item>,
        object: Option<Item>,
    ) -> Result<String> {
        attrs.push(Self::attribute(
            "Cryptographic Usage Mask",
            ttlv::integer(tag::ATTRIBUTE_VALUE, USAGE_ENCRYPT_DECRYPT),
        ));
        attrs.push(Self::name_attribute(label));
        let mut payload = vec![
            ttlv::enumeration(tag::OBJECT_TYPE, OBJECT_SYMMETRIC_KEY),
            ttlv::structure(tag::TEMPLATE_ATTRIBUTE, attrs),
        ];
        payload.extend(object);
        let reply = self
            .call(operation, payload)
            .map_err(|e| self.refuse_spec(spec, e))?;
        let uid = self.uid_of(&reply, operation)?;
        self.activate(&uid)?;
        Ok(uid)
    }

    /// Register imported material as an Active key (BYOK).
    pub fn register(&self, spec: KeySpec, label: &str, material: &[u8]) -> Result<String> {
        let (alg, len) = self.algorithm(spec);
        let key = ttlv::structure(
            tag::SYMMETRIC_KEY,
            vec![ttlv::structure(
                tag::KEY_BLOCK,
                vec![
                    ttlv::enumeration(tag::KEY_FORMAT_TYPE, KEY_FORMAT_RAW),
                    ttlv::structure(
                        tag::KEY_VALUE,
                        vec![ttlv::bytes(tag::KEY_MATERIAL, material)],
                    ),
                    ttlv::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, alg),
                    ttlv::integer(tag::CRYPTOGRAPHIC_LENGTH, len),
                ],
            )],
        );
        self.new_key(op::REGISTER, spec, label, Vec::new(), Some(key))
    }

    fn activate(&self, uid: &str) -> Result<()> {
        self.call(op::ACTIVATE, vec![ttlv::text(tag::UNIQUE_IDENTIFIER, uid)])?;
        Ok(())
    }

    /// The key's KMIP state.
    pub fn state(&self, uid: &str) -> Result<ServiceState> {
        let payload = match self.call_raw(
            op::GET_ATTRIBUTES,
            vec![
                ttlv::text(tag::UNIQUE_IDENTIFIER, uid),
                ttlv::text(tag::ATTRIBUTE_NAME, "State"),
            ],
        )? {
            Ok(p) => p,
            Err((Some(REASON_NOT_FOUND), _)) => return Ok(ServiceState::Gone),
            Err((_, text)) => return Err(err!(Refused, "{text}")),
        };
        let state = payload
            .child(tag::ATTRIBUTE)
            .and_then(|a| a.child(tag::ATTRIBUTE_VALUE))
            .and_then(Item::as_enum);
        Ok(match state {
            Some(1) => ServiceState::PreActive,
            Some(2) => ServiceState::Active,
            Some(3) => ServiceState::Deactivated,
            Some(4) => ServiceState::Compromised,
            Some(5) | Some(6) => ServiceState::Gone,
            other => {
                return Err(err!(
                    Corrupt,
                    "{} answered Get Attributes(State) with {other:?}, not a KMIP 1.x state",
                    self.name()
                ))
            }
        })
    }

    /// Destroy the key at the server (revoking it first if it is Active).
    pub fn destroy(&self, uid: &str) -> Result<()> {
        let state = self.state(uid)?;
        if state == ServiceState::Gone {
            return Ok(());
        }
        if state == ServiceState::Active {
            self.call(
                op::REVOKE,
                vec![
                    ttlv::text(tag::UNIQUE_IDENTIFIER, uid),
                    ttlv::structure(
                        tag::REVOCATION_REASON,
                        vec![ttlv::enumeration(
                            tag::REVOCATION_REASON_CODE,
                            REVOKE_CESSATION_OF_OPERATION,
                        )],
                    ),
                ],
            )?;
        }
        self.call(op::DESTROY, vec![ttlv::text(tag::UNIQUE_IDENTIFIER, uid)])?;
        Ok(())
    }

    fn gcm_parameters(alg: u32) -> Item {
        ttlv::structure(
            tag::CRYPTOGRAPHIC_PARAMETERS,
            vec![
                ttlv::enumeration(tag::BLOCK_CIPHER_MODE, MODE_GCM),
                ttlv::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, alg),
                ttlv::integer(tag::TAG_LENGTH, 16),
            ],
        )
    }

    /// AES-GCM (or SM4-GCM) encrypt `plain` under the key with `nonce` and `aad` at the
    /// server; returns ciphertext || tag.
    pub fn encrypt(
        &self,
        uid: &str,
        spec: KeySpec,
        nonce: &[u8],
        aad: &[u8],
        plain: &[u8],
    ) -> Result<Vec<u8>> {
        let (alg, _) = self.algorithm(spec);
        let payload = self.call(
            op::ENCRYPT,
            vec![
                ttlv::text(tag::UNIQUE_IDENTIFIER, uid),
                Self::gcm_parameters(alg),
                ttlv::bytes(tag::DATA, plain),
                ttlv::bytes(tag::IV_COUNTER_NONCE, nonce),
                ttlv::bytes(tag::AEAD_ADDITIONAL_DATA, aad),
            ],
        )?;
        let ct = payload.child(tag::DATA).and_then(Item::as_bytes);
        let t = payload.child(tag::AEAD_TAG).and_then(Item::as_bytes);
        match (ct, t) {
            (Some(ct), Some(t)) if ct.len() == plain.len() && t.len() == 16 => Ok([ct, t].concat()),
            _ => Err(err!(
                Corrupt,
                "{} answered Encrypt without GCM ciphertext and tag",
                self.name()
            )),
        }
    }

    /// Decrypt ciphertext || tag at the server.
    pub fn decrypt(
        &self,
        uid: &str,
        spec: KeySpec,
        nonce: &[u8],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        if sealed.len() < 16 {
            return Err(err!(Corrupt, "wrapped data key too short"));
        }
        let (alg, _) = self.algorithm(spec);
        let (ct, t) = sealed.split_at(sealed.len() - 16);
        let payload = self.call(
            op::DECRYPT,
            vec![
                ttlv::text(tag::UNIQUE_IDENTIFIER, uid),
                Self::gcm_parameters(alg),
                ttlv::bytes(tag::DATA, ct),
                ttlv::bytes(tag::IV_COUNTER_NONCE, nonce),
                ttlv::bytes(tag::AEAD_ADDITIONAL_DATA, aad),
                ttlv::bytes(tag::AEAD_TAG, t),
            ],
        )?;
        match payload.child(tag::DATA).map(|d| &d.value) {
            Some(Value::Bytes(p)) if p.len() == ct.len() => Ok(Zeroizing::new(p.clone())),
            _ => Err(err!(
                Corrupt,
                "{} answered Decrypt without the plaintext",
                self.name()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kmip_uris_and_refuses_bad_ones() {
        let u = KmipUri::parse("kmip://127.0.0.1:5696?ca=/c/ca.pem&cert=/c/c.pem&key=/c/k%20x.pem")
            .unwrap();
        assert_eq!(u.host, "127.0.0.1");
        assert_eq!(u.port, 5696);
        assert_eq!(u.key, PathBuf::from("/c/k x.pem"));
        assert_eq!(KmipUri::parse(&u.uri().replace("k x", "k%20x")).unwrap(), u);
        for bad in [
            "kmip://127.0.0.1?ca=a&cert=b&key=c",
            "kmip://:5696?ca=a&cert=b&key=c",
            "kmip://h:99999?ca=a&cert=b&key=c",
            "kmip://h:5696?ca=a&cert=b",
            "kmip://h:5696?ca=a&cert=b&key=c&pin=1234",
            "kmips://h:5696",
        ] {
            assert!(KmipUri::parse(bad).is_err(), "{bad}");
        }
    }
}
