//! Certificates made at test time (rcgen) in a temp dir: a CA, a server
//! certificate for `localhost` and 127.0.0.1, a client certificate from the
//! same CA, and one from a CA the server does not trust. No key material is
//! committed.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The certificates, in a temp dir that lives as long as this.
pub struct Pki {
    /// Where the files are: `ca.pem`, `NAME.pem` and `NAME.key` for the
    /// `server`, `client` and `rogue` pairs, and `rogue-ca.pem`.
    pub dir: tempfile::TempDir,
}

/// A certificate and its key, as files.
pub struct Pair {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    /// Makes a CA, a server pair for `localhost` and 127.0.0.1, a client
    /// pair from the same CA, and a `rogue` pair from an untrusted CA.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ca_pem, ca) = authority("jobd test CA");
        std::fs::write(dir.path().join("ca.pem"), ca_pem).unwrap();
        leaf(
            &ca,
            dir.path(),
            "server",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        leaf(
            &ca,
            dir.path(),
            "client",
            &["client"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let (rogue_pem, rogue) = authority("untrusted CA");
        std::fs::write(dir.path().join("rogue-ca.pem"), rogue_pem).unwrap();
        leaf(
            &rogue,
            dir.path(),
            "rogue",
            &["rogue"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Self { dir }
    }

    /// The trusted CA's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The pair named `name` (`server`, `client` or `rogue`).
    pub fn pair(&self, name: &str) -> Pair {
        Pair {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}.key")),
        }
    }

    /// The bytes of one of the files.
    pub fn read(&self, path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }
}

fn authority(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    dir: &Path,
    name: &str,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}
