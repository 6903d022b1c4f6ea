//! The TPM 2.0 sealer (tss-esapi over the system's tpm2-tss).
//!
//! Each key is a sealed KeyedHash object under a storage key: either a persistent SRK
//! (`srk_handle`, e.g. 0x81000001) or an ECC P-256 primary re-derived at each start in the owner
//! hierarchy from a fixed template (the same seed gives the same key, so old blobs load again).
//! The object's auth policy is PolicyPCR over the configured PCRs and bank, and it has no
//! userWithAuth: no password opens it, only the expected boot state. Every session that carries
//! a secret (the HMAC session authorising the storage key, the policy session of the unseal) is
//! salted with the storage key as tpmKey and encrypts its parameters, so the key bytes never
//! cross the bus in clear.
//!
//! Blob format (a JSON file, no secret in clear; `private` is encrypted by the storage key):
//! ```text
//! { "format": "hl7edge-tpm-seal-v1", "key": "message", "parent": "owner-primary-ecc-p256",
//!   "bank": "sha256", "pcrs": { "7": "<hex value at seal time>" }, "pcr_digest": "<hex>",
//!   "public": "<base64 TPM2B_PUBLIC>", "private": "<base64 TPM2B_PRIVATE>" }
//! ```
//! The PCR values recorded at seal time are not trusted for anything but the error message:
//! when the TPM refuses the policy, the PCRs whose current value differs are named.
//! The sealed data is the 32 key bytes followed by the key's name, so a blob copied over
//! another key's file is refused.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, SessionHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Digest, EccPoint, KeyedHashScheme, PcrSelectionList, PcrSelectionListBuilder, PcrSlot, Private,
    Public, PublicBuilder, PublicEccParametersBuilder, PublicKeyedHashParameters, SensitiveData,
    SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::Context;
use zeroize::Zeroizing;

use super::{Key, KeyError, Sealer};
use crate::config::{PcrBank, TpmSettings};

const FORMAT: &str = "hl7edge-tpm-seal-v1";
const PRIMARY: &str = "owner-primary-ecc-p256";

/// The on-disk form of a sealed key (no secret in clear).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Blob {
    format: String,
    key: String,
    parent: String,
    bank: PcrBank,
    /// PCR index -> hex value at seal time.
    pcrs: BTreeMap<u8, String>,
    /// SHA-256 of the concatenated values: what PolicyPCR was given at seal time.
    pcr_digest: String,
    public: String,
    private: String,
}

fn tss(e: tss_esapi::Error) -> String {
    e.to_string()
}

fn is_policy_failure(e: &tss_esapi::Error) -> bool {
    matches!(e, tss_esapi::Error::Tss2Error(rc)
        if matches!(rc.kind(), Some(Tss2ResponseCodeKind::PolicyFail | Tss2ResponseCodeKind::PolicyCc)))
}

fn hash_alg(bank: PcrBank) -> HashingAlgorithm {
    match bank {
        PcrBank::Sha1 => HashingAlgorithm::Sha1,
        PcrBank::Sha256 => HashingAlgorithm::Sha256,
        PcrBank::Sha384 => HashingAlgorithm::Sha384,
    }
}

fn slot(pcr: u8) -> Result<PcrSlot, String> {
    PcrSlot::try_from(1u32 << u32::from(pcr)).map_err(tss)
}

fn selection(bank: PcrBank, pcrs: &[u8]) -> Result<PcrSelectionList, String> {
    let slots = pcrs
        .iter()
        .map(|&p| slot(p))
        .collect::<Result<Vec<_>, _>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(hash_alg(bank), &slots)
        .build()
        .map_err(tss)
}

/// Describes a PCR set: `sha256:0,7`.
pub fn pcr_set(bank: PcrBank, pcrs: &[u8]) -> String {
    let list: Vec<String> = pcrs.iter().map(u8::to_string).collect();
    format!("{}:{}", bank.as_str(), list.join(","))
}

/// The PCRs whose current value differs from the recorded one, in index order.
fn differing(recorded: &BTreeMap<u8, String>, current: &[(u8, Vec<u8>)]) -> Vec<u8> {
    current
        .iter()
        .filter(|(i, v)| recorded.get(i).map(|r| r.to_ascii_lowercase()) != Some(hex::encode(v)))
        .map(|(i, _)| *i)
        .collect()
}

/// The digest PolicyPCR expects: the session's hash (SHA-256) over the concatenated values.
fn policy_pcr_digest(values: &[(u8, Vec<u8>)]) -> [u8; 32] {
    let mut h = Sha256::new();
    for (_, v) in values {
        h.update(v);
    }
    h.finalize().into()
}

/// The sealed data: key bytes then the key's name.
fn sealed_data(name: &str, key: &Key) -> Zeroizing<Vec<u8>> {
    let mut d = Zeroizing::new(Vec::with_capacity(32 + name.len()));
    d.extend_from_slice(key.bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

/// Seals keys in a TPM; one owner of the TPM context (every call takes `&mut self`).
pub struct TpmSealer {
    ctx: Context,
    primary: KeyHandle,
    /// Salted, encrypting HMAC session that authorises use of the storage key.
    hmac: AuthSession,
    parent: String,
    tcti: String,
    bank: PcrBank,
    pcrs: Vec<u8>,
}

impl TpmSealer {
    /// Connects to the TPM and loads (or derives) the storage key.
    pub fn open(settings: &TpmSettings) -> Result<TpmSealer, KeyError> {
        let open_err = |reason: String| KeyError::TpmOpen {
            tcti: settings.tcti.clone(),
            reason,
        };
        let conf = TctiNameConf::from_str(&settings.tcti).map_err(|e| open_err(tss(e)))?;
        if let TctiNameConf::Device(_) = &conf {
            let path = settings
                .tcti
                .strip_prefix("device:")
                .filter(|p| !p.is_empty())
                .unwrap_or("/dev/tpm0");
            if !Path::new(path).exists() {
                return Err(open_err(format!(
                    "{path} does not exist: this machine has no TPM (or its driver is not loaded)"
                )));
            }
        }
        let mut ctx = Context::new(conf).map_err(|e| {
            open_err(format!(
                "no TPM answers there, or it is busy with another client (TCTI: {})",
                tss(e)
            ))
        })?;
        let (primary, parent) = match settings.srk_handle {
            Some(h) => {
                let handle = PersistentTpmHandle::new(h).map_err(|e| open_err(tss(e)))?;
                let obj = ctx
                    .tr_from_tpm_public(TpmHandle::Persistent(handle))
                    .map_err(|e| KeyError::TpmStorageKey {
                        parent: format!("{h:#010x}"),
                        reason: format!("the persistent storage key is not there: {}", tss(e)),
                    })?;
                (KeyHandle::from(obj), format!("{h:#010x}"))
            }
            None => (
                create_primary(&mut ctx).map_err(|reason| KeyError::TpmStorageKey {
                    parent: PRIMARY.into(),
                    reason,
                })?,
                PRIMARY.to_string(),
            ),
        };
        let hmac = start_session(&mut ctx, primary, SessionType::Hmac).map_err(|reason| {
            KeyError::TpmStorageKey {
                parent: parent.clone(),
                reason: format!("cannot start a salted session: {reason}"),
            }
        })?;
        Ok(TpmSealer {
            ctx,
            primary,
            hmac,
            parent,
            tcti: settings.tcti.clone(),
            bank: settings.bank,
            pcrs: settings.pcrs.clone(),
        })
    }

    /// Current values of `pcrs` in `bank`, one read per PCR.
    fn read_pcrs(&mut self, bank: PcrBank, pcrs: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, String> {
        self.ctx.clear_sessions();
        let mut out = Vec::with_capacity(pcrs.len());
        for &p in pcrs {
            let (_, _, digests) = self.ctx.pcr_read(selection(bank, &[p])?).map_err(tss)?;
            let v = digests.value().first().ok_or_else(|| {
                format!("the TPM has no {} bank value for PCR {p}", bank.as_str())
            })?;
            out.push((p, v.value().to_vec()));
        }
        Ok(out)
    }

    /// The policy digest of PolicyPCR(values) from a trial session.
    fn trial_policy(&mut self, bank: PcrBank, values: &[(u8, Vec<u8>)]) -> Result<Digest, String> {
        let pcrs: Vec<u8> = values.iter().map(|(i, _)| *i).collect();
        let trial = start_session(&mut self.ctx, self.primary, SessionType::Trial)?;
        let result = (|| {
            let policy = PolicySession::try_from(trial).map_err(tss)?;
            let digest = Digest::try_from(policy_pcr_digest(values).to_vec()).map_err(tss)?;
            self.ctx
                .policy_pcr(policy, digest, selection(bank, &pcrs)?)
                .map_err(tss)?;
            self.ctx.policy_get_digest(policy).map_err(tss)
        })();
        flush_session(&mut self.ctx, trial);
        result
    }

    fn seal_inner(&mut self, name: &str, key: &Key) -> Result<Vec<u8>, String> {
        let (bank, pcrs) = (self.bank, self.pcrs.clone());
        let values = self.read_pcrs(bank, &pcrs)?;
        let auth_policy = self.trial_policy(bank, &values)?;
        let attributes = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_no_da(true)
            .with_admin_with_policy(true)
            // No userWithAuth: an (empty) password must not bypass the PCR policy.
            .with_user_with_auth(false)
            .build()
            .map_err(tss)?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes)
            .with_auth_policy(auth_policy)
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()
            .map_err(tss)?;
        let data = sealed_data(name, key);
        let sensitive = SensitiveData::try_from(data.to_vec()).map_err(tss)?;
        self.ctx.set_sessions((Some(self.hmac), None, None));
        let created = self
            .ctx
            .create(self.primary, public, None, Some(sensitive), None, None);
        self.ctx.clear_sessions();
        let created = created.map_err(tss)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let blob = Blob {
            format: FORMAT.into(),
            key: name.into(),
            parent: self.parent.clone(),
            bank,
            pcrs: values.iter().map(|(i, v)| (*i, hex::encode(v))).collect(),
            pcr_digest: hex::encode(policy_pcr_digest(&values)),
            public: b64.encode(created.out_public.marshall().map_err(tss)?),
            private: b64.encode(created.out_private.value()),
        };
        let mut text = serde_json::to_vec_pretty(&blob).map_err(|e| e.to_string())?;
        text.push(b'\n');
        Ok(text)
    }

    fn parse(name: &'static str, blob: &[u8], path: &Path) -> Result<Blob, KeyError> {
        let corrupt = |reason: String| KeyError::BlobCorrupt {
            name,
            path: path.to_path_buf(),
            reason,
        };
        let b: Blob = serde_json::from_slice(blob).map_err(|_| {
            corrupt("not a TPM-sealed key (sealed by the development sealer, or damaged)".into())
        })?;
        if b.format != FORMAT {
            return Err(corrupt(format!("unknown format {:?}", b.format)));
        }
        if b.key != name {
            return Err(corrupt(format!("it holds the {} key", b.key)));
        }
        if b.pcrs.is_empty() {
            return Err(corrupt("no PCR selection".into()));
        }
        Ok(b)
    }
}

fn create_primary(ctx: &mut Context) -> Result<KeyHandle, String> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(tss)?;
    let params = PublicEccParametersBuilder::new_restricted_decryption_key(
        SymmetricDefinitionObject::AES_128_CFB,
        EccCurve::NistP256,
    )
    .build()
    .map_err(tss)?;
    let public = PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(params)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(tss)?;
    // The owner hierarchy's authorisation is empty on these boxes; nothing secret is sent.
    ctx.set_sessions((Some(AuthSession::Password), None, None));
    let r = ctx.create_primary(Hierarchy::Owner, public, None, None, None, None);
    ctx.clear_sessions();
    Ok(r.map_err(tss)?.key_handle)
}

/// A session salted with the storage key (tpmKey), encrypting command and response parameters.
fn start_session(
    ctx: &mut Context,
    tpm_key: KeyHandle,
    kind: SessionType,
) -> Result<AuthSession, String> {
    ctx.clear_sessions();
    let s = ctx
        .start_auth_session(
            Some(tpm_key),
            None,
            None,
            kind,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .map_err(tss)?
        .ok_or("the TPM returned no session")?;
    if kind != SessionType::Trial {
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_encrypt(true)
            .with_continue_session(true)
            .build();
        ctx.tr_sess_set_attributes(s, attrs, mask).map_err(tss)?;
    }
    Ok(s)
}

fn flush_session(ctx: &mut Context, s: AuthSession) {
    let _ = ctx.flush_context(ObjectHandle::from(SessionHandle::from(s)));
}

impl Sealer for TpmSealer {
    fn describe(&self) -> String {
        format!(
            "TPM 2.0 at {}, storage key {}, policy PCR {}",
            self.tcti,
            self.parent,
            pcr_set(self.bank, &self.pcrs)
        )
    }

    fn blob_policy(&self, blob: &[u8]) -> Option<String> {
        let b: Blob = serde_json::from_slice(blob).ok()?;
        let pcrs: Vec<u8> = b.pcrs.keys().copied().collect();
        Some(pcr_set(b.bank, &pcrs))
    }

    fn seal(&mut self, name: &'static str, key: &Key) -> Result<Vec<u8>, KeyError> {
        self.seal_inner(name, key)
            .map_err(|reason| KeyError::TpmSeal { name, reason })
    }

    fn unseal(&mut self, name: &'static str, blob: &[u8], path: &Path) -> Result<Key, KeyError> {
        let b = Self::parse(name, blob, path)?;
        let corrupt = |reason: String| KeyError::BlobCorrupt {
            name,
            path: path.to_path_buf(),
            reason,
        };
        if b.parent != self.parent {
            return Err(KeyError::TpmLoad {
                name,
                path: path.to_path_buf(),
                reason: format!(
                    "it was sealed under storage key {}, the configuration names {}",
                    b.parent, self.parent
                ),
            });
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let public = b64
            .decode(&b.public)
            .ok()
            .and_then(|v| Public::unmarshall(&v).ok())
            .ok_or_else(|| corrupt("bad public part".into()))?;
        let private = b64
            .decode(&b.private)
            .ok()
            .and_then(|v| Private::try_from(v).ok())
            .ok_or_else(|| corrupt("bad private part".into()))?;
        let pcrs: Vec<u8> = b.pcrs.keys().copied().collect();
        let tpm_err = |reason: String| KeyError::TpmUnseal {
            name,
            path: path.to_path_buf(),
            reason,
        };
        let current = self.read_pcrs(b.bank, &pcrs).map_err(tpm_err)?;

        self.ctx.set_sessions((Some(self.hmac), None, None));
        let loaded = self.ctx.load(self.primary, private, public);
        self.ctx.clear_sessions();
        let object = loaded.map_err(|e| KeyError::TpmLoad {
            name,
            path: path.to_path_buf(),
            reason: format!(
                "the TPM refused the blob ({}): it was sealed by another TPM or is corrupt",
                tss(e)
            ),
        })?;

        let result = (|| {
            let session = start_session(&mut self.ctx, self.primary, SessionType::Policy)
                .map_err(|r| (None, r))?;
            let r = (|| {
                let policy = PolicySession::try_from(session).map_err(|e| (None, tss(e)))?;
                let digest = Digest::try_from(policy_pcr_digest(&current).to_vec())
                    .map_err(|e| (None, tss(e)))?;
                let sel = selection(b.bank, &pcrs).map_err(|r| (None, r))?;
                self.ctx
                    .policy_pcr(policy, digest, sel)
                    .map_err(|e| (None, tss(e)))?;
                self.ctx.set_sessions((Some(session), None, None));
                let out = self.ctx.unseal(object.into());
                self.ctx.clear_sessions();
                out.map_err(|e| (Some(e), tss(e)))
            })();
            flush_session(&mut self.ctx, session);
            r
        })();
        let _ = self.ctx.flush_context(ObjectHandle::from(object));

        let data = match result {
            Ok(d) => d,
            Err((Some(e), reason)) if is_policy_failure(&e) => {
                let changed = differing(&b.pcrs, &current);
                return Err(if changed.is_empty() {
                    KeyError::PolicyRefused {
                        name,
                        path: path.to_path_buf(),
                        reason,
                    }
                } else {
                    KeyError::PcrMismatch {
                        name,
                        path: path.to_path_buf(),
                        bank: b.bank.as_str(),
                        changed,
                    }
                });
            }
            Err((_, reason)) => return Err(tpm_err(reason)),
        };
        let bytes = data.value();
        if bytes.len() != 32 + name.len() || &bytes[32..] != name.as_bytes() {
            return Err(corrupt("the sealed data is not this key".into()));
        }
        let mut k = Zeroizing::new([0u8; 32]);
        k.copy_from_slice(&bytes[..32]);
        Ok(Key(k))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn differing_names_changed_and_missing_pcrs() {
        let recorded: BTreeMap<u8, String> = [(0, "00".repeat(32)), (7, "AB".repeat(32))]
            .into_iter()
            .collect();
        let same = vec![(0, vec![0u8; 32]), (7, vec![0xab; 32])];
        assert!(differing(&recorded, &same).is_empty());
        let changed = vec![(0, vec![0u8; 32]), (7, vec![0xac; 32]), (9, vec![0; 32])];
        assert_eq!(differing(&recorded, &changed), vec![7, 9]);
    }

    #[test]
    fn policy_digest_is_sha256_of_the_concatenation() {
        let v = vec![(7u8, vec![0u8; 32])];
        assert_eq!(
            hex::encode(policy_pcr_digest(&v)),
            "66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925"
        );
        assert_eq!(pcr_set(PcrBank::Sha256, &[0, 7]), "sha256:0,7");
        assert!(slot(7).is_ok() && slot(23).is_ok());
    }

    #[test]
    fn blobs_of_other_keys_and_garbage_are_corrupt() {
        let p = Path::new("/s/keys/message-1.sealed");
        let e = TpmSealer::parse("message", b"\x00\x01garbage", p).unwrap_err();
        assert!(e.to_string().contains("message key"), "{e}");
        let blob = Blob {
            format: FORMAT.into(),
            key: "audit".into(),
            parent: PRIMARY.into(),
            bank: PcrBank::Sha256,
            pcrs: [(7, "00".repeat(32))].into_iter().collect(),
            pcr_digest: String::new(),
            public: String::new(),
            private: String::new(),
        };
        let text = serde_json::to_vec(&blob).unwrap();
        let e = TpmSealer::parse("message", &text, p).unwrap_err();
        assert!(e.to_string().contains("holds the audit key"), "{e}");
        assert!(TpmSealer::parse("audit", &text, p).is_ok());
    }
}
