//! Throwaway PKI for the demo, the benchmark and tests: a CA, a server certificate for
//! `localhost`/127.0.0.1 and client certificates, written as PEM files (keys mode 0600).
//! Never used on a production box: there, certificates come from the provisioning bundle.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Paths of the files [`generate`] wrote.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn write(path: &Path, data: &str, private: bool) -> std::io::Result<()> {
    // Always a new file (O_EXCL, no symlink followed), so a private key never inherits the
    // permissions of a file that was there before.
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)?;
    f.write_all(data.as_bytes())
}

/// Generates a CA, a server certificate and a client certificate with common name `client_cn`
/// into `dir`.
pub fn generate(dir: &Path, client_cn: &str) -> anyhow::Result<DevPki> {
    fs::create_dir_all(dir)?;
    let mut ca_params = CertificateParams::new(Vec::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "hl7edge demo CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |cn: &str,
                sans: Vec<String>,
                eku: ExtendedKeyUsagePurpose|
     -> anyhow::Result<(String, String)> {
        let mut p = CertificateParams::new(sans)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![eku];
        p.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_pem, server_key) = leaf(
        "localhost",
        vec!["localhost".into(), "127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_pem, client_key) = leaf(
        client_cn,
        vec![format!("{client_cn}.clinic.invalid")],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let pki = DevPki {
        ca_cert: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    };
    write(&pki.ca_cert, &ca_cert.pem(), false)?;
    write(&pki.server_cert, &server_pem, false)?;
    write(&pki.server_key, &server_key, true)?;
    write(&pki.client_cert, &client_pem, false)?;
    write(&pki.client_key, &client_key, true)?;
    Ok(pki)
}

/// A rustls client configuration trusting the demo CA and presenting the client certificate.
pub fn client_config(pki: &DevPki) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    use crate::listen::tls::{load_certs, load_key, load_roots, provider};
    let roots = load_roots(&pki.ca_cert)?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(&pki.client_cert)?, load_key(&pki.client_key)?)?;
    Ok(std::sync::Arc::new(config))
}
