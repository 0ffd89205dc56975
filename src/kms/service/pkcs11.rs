//! A PKCS#11 token as a key service (`pkcs11:module-path=LIB;token=LABEL?pin-source=FILE`,
//! RFC 7512), through `cryptoki`. CMKs are AES secret keys generated on the token
//! (sensitive, never extractable); data keys are wrapped with CKM_AES_GCM on the token.
//! A key's state is its usage attributes: CKA_ENCRYPT and CKA_DECRYPT both true is usable,
//! anything else is disabled at the token.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::ServiceState;
use crate::err;
use crate::error::{Error, Result};
use crate::kms::KeySpec;

/// The token and the files that open it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkcs11Uri {
    pub module: PathBuf,
    pub token: String,
    pub pin_file: PathBuf,
}

impl Pkcs11Uri {
    /// Parse `pkcs11:module-path=LIB;token=LABEL?pin-source=FILE` (RFC 7512; `pin-source`
    /// may be `file:///PATH` or a path).
    pub fn parse(s: &str) -> Result<Pkcs11Uri> {
        let usage = "pkcs11:module-path=LIB;token=LABEL?pin-source=FILE";
        let rest = s
            .strip_prefix("pkcs11:")
            .ok_or_else(|| err!(InvalidInput, "a PKCS#11 URI starts with pkcs11: ({usage})"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (mut module, mut token, mut pin) = (None, None, None);
        for (part, sep) in [(path, ';'), (query, '&')] {
            for kv in part.split(sep).filter(|p| !p.is_empty()) {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                let v = super::percent_decode(v)?;
                match k {
                    "module-path" => module = Some(PathBuf::from(v)),
                    "token" => token = Some(v),
                    "pin-source" => {
                        let p = v
                            .strip_prefix("file://")
                            .or_else(|| v.strip_prefix("file:"))
                            .unwrap_or(&v)
                            .to_string();
                        pin = Some(PathBuf::from(p));
                    }
                    "pin-value" => {
                        return Err(err!(
                            InvalidInput,
                            "{k} is refused: the PIN comes from a file (pin-source=FILE), never from the command line"
                        ))
                    }
                    _ => {
                        return Err(err!(
                            InvalidInput,
                            "unknown PKCS#11 URI attribute '{k}' ({usage})"
                        ))
                    }
                }
            }
        }
        Ok(Pkcs11Uri {
            module: module
                .ok_or_else(|| err!(InvalidInput, "{s}: module-path= is missing ({usage})"))?,
            token: token.ok_or_else(|| err!(InvalidInput, "{s}: token= is missing ({usage})"))?,
            pin_file: pin
                .ok_or_else(|| err!(InvalidInput, "{s}: pin-source= is missing ({usage})"))?,
        })
    }

    pub fn uri(&self) -> String {
        format!(
            "pkcs11:module-path={};token={}?pin-source={}",
            self.module.display(),
            self.token,
            self.pin_file.display()
        )
    }
}

/// A token, opened (module loaded, session logged in) on first use.
#[derive(Debug)]
pub struct Token {
    uri: Pkcs11Uri,
    session: Mutex<Option<Session>>,
}

/// Each module is loaded and initialized once per process.
fn module(path: &PathBuf) -> std::result::Result<Arc<Pkcs11>, CkError> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Arc<Pkcs11>>>> = OnceLock::new();
    let mut m = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = m.get(path) {
        return Ok(p.clone());
    }
    let p = Pkcs11::new(path)?;
    match p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(e),
    }
    let p = Arc::new(p);
    m.insert(path.clone(), p.clone());
    Ok(p)
}

impl Token {
    pub fn new(uri: Pkcs11Uri) -> Token {
        Token {
            uri,
            session: Mutex::new(None),
        }
    }

    pub fn name(&self) -> String {
        format!(
            "PKCS#11 token '{}' ({})",
            self.uri.token,
            self.uri.module.display()
        )
    }

    pub fn uri(&self) -> String {
        self.uri.uri()
    }

    fn fail(&self, what: &str, e: CkError) -> Error {
        let unusable = matches!(
            e,
            CkError::Pkcs11(
                RvError::KeyFunctionNotPermitted
                    | RvError::KeyHandleInvalid
                    | RvError::ObjectHandleInvalid
                    | RvError::PinIncorrect
                    | RvError::PinLocked
                    | RvError::TokenNotPresent
                    | RvError::DeviceRemoved
                    | RvError::DeviceError,
                _
            )
        );
        let text = format!("{} refused {what}: {e}", self.name());
        if unusable {
            err!(KeyUnusable, "{text}")
        } else {
            err!(Refused, "{text}")
        }
    }

    fn open(&self) -> Result<Session> {
        let u = &self.uri;
        let p = module(&u.module)
            .map_err(|e| err!(KeyUnusable, "{}: cannot load the module: {e}", self.name()))?;
        let slot = self.find_slot(&p)?;
        let session = p
            .open_rw_session(slot)
            .map_err(|e| self.fail("a session", e))?;
        let raw = crate::sys::read_regular(&u.pin_file, 4096)
            .map(Zeroizing::new)
            .map_err(|e| e.context(format!("{} PIN file", self.name())))?;
        let text = std::str::from_utf8(&raw)
            .map_err(|_| err!(InvalidInput, "{}: the PIN file is not text", self.name()))?;
        let pin = AuthPin::from(text.trim_end_matches(['\n', '\r']).to_string());
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(self.fail("the login (check pin-source)", e)),
        }
        Ok(session)
    }

    fn find_slot(&self, p: &Pkcs11) -> Result<Slot> {
        let slots = p
            .get_slots_with_token()
            .map_err(|e| self.fail("the slot list", e))?;
        for s in slots {
            if let Ok(info) = p.get_token_info(s) {
                if info.label().trim_end() == self.uri.token {
                    return Ok(s);
                }
            }
        }
        Err(err!(
            KeyUnusable,
            "{}: no token with that label in the module",
            self.name()
        ))
    }

    /// Run `f` with the logged-in session (opened on first use).
    fn with<T>(&self, f: impl Fn(&Session) -> Result<T>) -> Result<T> {
        let mut slot = self.session.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(self.open()?);
        }
        super::count_request();
        f(slot.as_ref().unwrap())
    }

    fn check_spec(&self, spec: KeySpec) -> Result<()> {
        if spec == KeySpec::Sm4 {
            return Err(err!(
                Refused,
                "{} cannot hold SM4 keys (PKCS#11 defines no SM4 mechanism); use an AES_256 key in this region, or SM4 in a local region",
                self.name()
            ));
        }
        Ok(())
    }

    fn template(label: &str, id: &[u8]) -> Vec<Attribute> {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Modifiable(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ]
    }

    fn new_id() -> [u8; 16] {
        let mut id = [0u8; 16];
        crate::crypto::random_fill(&mut id);
        id
    }

    /// Generate a key on the token; returns its CKA_ID in hex.
    pub fn create(&self, spec: KeySpec, label: &str) -> Result<String> {
        self.check_spec(spec)?;
        let id = Self::new_id();
        self.with(|s| {
            let mut t = Self::template(label, &id);
            t.push(Attribute::ValueLen(32.into()));
            s.generate_key(&Mechanism::AesKeyGen, &t)
                .map_err(|e| self.fail("key generation", e))
        })?;
        Ok(hex::encode(id))
    }

    /// Import material as a key on the token (BYOK).
    pub fn register(&self, spec: KeySpec, label: &str, material: &[u8]) -> Result<String> {
        self.check_spec(spec)?;
        let id = Self::new_id();
        self.with(|s| {
            let mut t = Self::template(label, &id);
            t.push(Attribute::Value(material.to_vec()));
            let r = s
                .create_object(&t)
                .map_err(|e| self.fail("the key import", e));
            // The template's copy of the material.
            if let Some(Attribute::Value(v)) = t.last_mut() {
                zeroize::Zeroize::zeroize(v);
            }
            r
        })?;
        Ok(hex::encode(id))
    }

    fn handle(&self, s: &Session, id: &str) -> Result<Option<ObjectHandle>> {
        let raw = hex::decode(id).map_err(|_| err!(Corrupt, "bad PKCS#11 key id {id}"))?;
        let found = s
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Id(raw),
            ])
            .map_err(|e| self.fail("the key lookup", e))?;
        Ok(found.first().copied())
    }

    fn must_handle(&self, s: &Session, id: &str) -> Result<ObjectHandle> {
        self.handle(s, id)?.ok_or_else(|| {
            err!(
                KeyUnusable,
                "{} no longer holds the key (CKA_ID {id}): it was deleted there",
                self.name()
            )
        })
    }

    pub fn encrypt(&self, id: &str, nonce: &[u8], aad: &[u8], plain: &[u8]) -> Result<Vec<u8>> {
        self.with(|s| {
            let h = self.must_handle(s, id)?;
            let mut iv = nonce.to_vec();
            let params = GcmParams::new(&mut iv, aad, 128.into())
                .map_err(|e| err!(InvalidInput, "GCM parameters: {e}"))?;
            s.encrypt(&Mechanism::AesGcm(params), h, plain)
                .map_err(|e| self.fail("Encrypt (the key may be disabled there)", e))
        })
    }

    pub fn decrypt(
        &self,
        id: &str,
        nonce: &[u8],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        self.with(|s| {
            let h = self.must_handle(s, id)?;
            let mut iv = nonce.to_vec();
            let params = GcmParams::new(&mut iv, aad, 128.into())
                .map_err(|e| err!(InvalidInput, "GCM parameters: {e}"))?;
            s.decrypt(&Mechanism::AesGcm(params), h, sealed)
                .map(Zeroizing::new)
                .map_err(|e| match e {
                    CkError::Pkcs11(RvError::EncryptedDataInvalid, _) => err!(
                        Corrupt,
                        "the data key does not unwrap at {}: the header was altered",
                        self.name()
                    ),
                    e => self.fail("Decrypt (the key may be disabled there)", e),
                })
        })
    }

    pub fn state(&self, id: &str) -> Result<ServiceState> {
        self.with(|s| {
            let Some(h) = self.handle(s, id)? else {
                return Ok(ServiceState::Gone);
            };
            let attrs = s
                .get_attributes(h, &[AttributeType::Encrypt, AttributeType::Decrypt])
                .map_err(|e| self.fail("the key's attributes", e))?;
            let on = attrs
                .iter()
                .filter(|a| matches!(a, Attribute::Encrypt(true) | Attribute::Decrypt(true)))
                .count();
            Ok(if on == 2 {
                ServiceState::Active
            } else {
                ServiceState::Disabled
            })
        })
    }

    /// Turn the key's usage attributes on or off.
    pub fn set_enabled(&self, id: &str, on: bool) -> Result<()> {
        self.with(|s| {
            let h = self.must_handle(s, id)?;
            s.update_attributes(h, &[Attribute::Encrypt(on), Attribute::Decrypt(on)])
                .map_err(|e| self.fail("the key's attributes", e))
        })
    }

    pub fn destroy(&self, id: &str) -> Result<()> {
        self.with(|s| match self.handle(s, id)? {
            Some(h) => s
                .destroy_object(h)
                .map_err(|e| self.fail("the key's destruction", e)),
            None => Ok(()),
        })
    }

    /// Whether the token offers AES-GCM (checked when a region is added).
    pub fn check_mechanisms(&self) -> Result<()> {
        let p = module(&self.uri.module)
            .map_err(|e| err!(KeyUnusable, "{}: cannot load the module: {e}", self.name()))?;
        let slot = self.find_slot(&p)?;
        for m in [MechanismType::AES_KEY_GEN, MechanismType::AES_GCM] {
            if p.get_mechanism_info(slot, m).is_err() {
                return Err(err!(
                    Refused,
                    "{} does not offer {m} (encimg wraps data keys with AES-GCM on the token)",
                    self.name()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc7512_uris_and_refuses_pins_on_the_command_line() {
        let u = Pkcs11Uri::parse(
            "pkcs11:module-path=/usr/lib/softhsm/libsofthsm2.so;token=enc%20img?pin-source=file:///etc/pin",
        )
        .unwrap();
        assert_eq!(u.module, PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"));
        assert_eq!(u.token, "enc img");
        assert_eq!(u.pin_file, PathBuf::from("/etc/pin"));
        assert!(Pkcs11Uri::parse("pkcs11:module-path=/m.so;token=t?pin-value=1234").is_err());
        assert!(Pkcs11Uri::parse("pkcs11:token=t?pin-source=/p").is_err());
        assert!(Pkcs11Uri::parse("pkcs11:module-path=/m.so;token=t").is_err());
        assert!(Pkcs11Uri::parse("pkcs11:module-path=/m.so;token=t;slot=3?pin-source=/p").is_err());
    }
}
