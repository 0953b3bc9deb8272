//! The cluster's certificates: a CA, one certificate per node, one for the admin client, and a
//! random cookie for ractor_cluster's handshake. Private keys and the cookie are written 0600;
//! nothing is ever overwritten.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rand::RngExt;

use crate::role::{CLIENT_MARK, NODE_MARK, READ_ONLY_MARK};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// The name of the admin client's files (`admin.pem`, `admin.key`).
pub const ADMIN: &str = "admin";
/// The CA's files (`ca.pem`, `ca.key`).
pub const CA: &str = "ca";
/// The cookie file.
pub const COOKIE: &str = "cookie";

/// Why certificates could not be made or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The directory already holds a cluster (init refuses to overwrite).
    #[error("{0} already holds cluster certificates; refusing to overwrite them")]
    Exists(PathBuf),
    /// A certificate for that name exists already.
    #[error("{0} exists already; refusing to overwrite it")]
    NameTaken(PathBuf),
    /// A name that cannot be a node name.
    #[error("invalid node name {name:?}: {reason}")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file is not what it should be.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a new file (never replacing one), with `mode` permissions.
pub(crate) fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CertError::NameTaken(path.to_path_buf())
            } else {
                CertError::Io {
                    path: path.to_path_buf(),
                    source: e,
                }
            }
        })?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(io(path))
}

fn ca_params() -> Result<CertificateParams, CertError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Flotilla cluster CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

fn check_name(name: &str) -> Result<(), CertError> {
    flotilla_runtime::NodeId::try_from(name.to_owned())
        .map(|_| ())
        .map_err(|e| CertError::BadName {
            name: name.to_owned(),
            reason: e.to_string(),
        })
}

/// Issues `name.pem`/`name.key` in `dir`, signed by the CA there. Node certificates carry the
/// node's name, `localhost`, `127.0.0.1`, `::1` and `sans` as subject alternative names.
fn issue(dir: &Path, name: &str, sans: &[String], role: &str, ca_key: &KeyPair) -> Result<(), CertError> {
    let mut names = vec![
        name.to_owned(),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
        role.to_owned(),
    ];
    names.extend(sans.iter().filter(|s| !s.is_empty()).cloned());
    names.dedup();
    let mut p = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let cert = p.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    if cert_path.exists() || key_path.exists() {
        return Err(CertError::NameTaken(cert_path));
    }
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)
}

/// Makes a new cluster in `dir`: the CA, a certificate per node, the admin's, and the cookie.
/// Refuses a directory that already holds a cluster.
pub fn init(dir: &Path, nodes: &[String], sans: &[String]) -> Result<(), CertError> {
    for n in nodes {
        check_name(n)?;
    }
    if dir.join(format!("{CA}.pem")).exists() || dir.join(format!("{CA}.key")).exists() {
        return Err(CertError::Exists(dir.to_path_buf()));
    }
    fs::create_dir_all(dir).map_err(io(dir))?;
    let ca_key = KeyPair::generate()?;
    let ca = ca_params()?.self_signed(&ca_key)?;
    write_new(
        &dir.join(format!("{CA}.key")),
        ca_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new(&dir.join(format!("{CA}.pem")), ca.pem().as_bytes(), 0o644)?;
    let cookie: String = {
        let mut rng = rand::rng();
        (0..32).map(|_| format!("{:02x}", rng.random::<u8>())).collect()
    };
    write_new(&dir.join(COOKIE), cookie.as_bytes(), 0o600)?;
    write_new(
        &dir.join(crate::secrets::KEY_FILE),
        crate::secrets::SecretsKey::generate().encode().as_bytes(),
        0o600,
    )?;
    for n in nodes {
        issue(dir, n, sans, NODE_MARK, &ca_key)?;
    }
    issue(dir, ADMIN, &[], CLIENT_MARK, &ca_key)
}

/// Issues one more node certificate from the CA in `dir`.
pub fn add_node(dir: &Path, name: &str, sans: &[String]) -> Result<(), CertError> {
    check_name(name)?;
    issue(dir, name, sans, NODE_MARK, &ca_key(dir)?)
}

/// Issues a client certificate (`name.pem`/`name.key`) from the CA in `dir`; a read-only
/// client's requests that would change anything are refused with `forbidden`.
pub fn add_client(dir: &Path, name: &str, read_only: bool) -> Result<(), CertError> {
    check_name(name)?;
    let role = if read_only { READ_ONLY_MARK } else { CLIENT_MARK };
    issue(dir, name, &[], role, &ca_key(dir)?)
}

fn ca_key(dir: &Path) -> Result<KeyPair, CertError> {
    let key_path = dir.join(format!("{CA}.key"));
    let pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;
    KeyPair::from_pem(&pem).map_err(|e| CertError::Invalid {
        path: key_path.clone(),
        reason: e.to_string(),
    })
}

/// The cookie of the cluster whose certificates are in `dir`.
pub fn cookie(dir: &Path) -> Result<String, CertError> {
    let path = dir.join(COOKIE);
    let c = fs::read_to_string(&path).map_err(io(&path))?;
    let c = c.trim().to_owned();
    if c.len() < 16 {
        return Err(CertError::Invalid {
            path,
            reason: "the cookie is too short".into(),
        });
    }
    Ok(c)
}
