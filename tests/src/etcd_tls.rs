//! etcd over TLS for tests and the lab: a certificate authority, etcd's
//! server certificate and client certificates made on the spot (`rcgen`),
//! and an etcd started on loopback with `--client-cert-auth` whose process
//! and data directory a guard removes, also when the test fails.

use std::{
    fs,
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A CA and the certificates it signed, as PEM files in `dir`:
/// `ca.pem`, `server.pem`/`server-key.pem`, `<user>.pem`/`<user>-key.pem`.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// A new CA in `dir`, with a server certificate for `server_ips` and a
    /// client certificate per user (common name = the etcd user name).
    pub fn generate(dir: &Path, server_ips: &[Ipv4Addr], users: &[&str]) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = Self {
            dir: dir.to_owned(),
        };
        let ca_key = KeyPair::generate().context("CA key")?;
        let ca = ca_params()?;
        let ca_cert = ca.self_signed(&ca_key).context("CA certificate")?;
        pki.write("ca.pem", &ca_cert.pem())?;
        // Kept (0600) for `issue`: the lab makes a joining node's later.
        pki.write("ca-key.pem", &ca_key.serialize_pem())?;
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate().context("server key")?;
        let mut server = CertificateParams::new(vec!["localhost".to_owned()]).context("params")?;
        server.distinguished_name.push(DnType::CommonName, "etcd");
        server
            .subject_alt_names
            .extend(server_ips.iter().map(|ip| SanType::IpAddress((*ip).into())));
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            // etcd's own gRPC gateway dials itself with the server
            // certificate as a client.
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = server
            .signed_by(&key, &issuer)
            .context("server certificate")?;
        pki.write("server.pem", &cert.pem())?;
        pki.write("server-key.pem", &key.serialize_pem())?;
        for user in users {
            pki.issue_with(&issuer, user)?;
        }
        Ok(pki)
    }

    /// A client certificate for `user` (common name), signed by this CA.
    pub fn issue(&self, user: &str) -> anyhow::Result<()> {
        let path = self.dir.join("ca-key.pem");
        let pem =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let key = KeyPair::from_pem(&pem).context("the CA key")?;
        // The issuer is its name, key usages and key: the same as at
        // `generate`, so the chain verifies.
        self.issue_with(&Issuer::new(ca_params()?, key), user)
    }

    fn issue_with(&self, issuer: &Issuer<'_, KeyPair>, user: &str) -> anyhow::Result<()> {
        let key = KeyPair::generate().context("client key")?;
        let mut params = CertificateParams::new(Vec::<String>::new()).context("params")?;
        params.distinguished_name.push(DnType::CommonName, user);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params
            .signed_by(&key, issuer)
            .with_context(|| format!("{user}'s certificate"))?;
        self.write(&format!("{user}.pem"), &cert.pem())?;
        self.write(&format!("{user}-key.pem"), &key.serialize_pem())
    }

    fn write(&self, name: &str, pem: &str) -> anyhow::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = self.dir.join(name);
        // Keys are the holder's alone.
        let mode = if name.ends_with("-key.pem") {
            0o600
        } else {
            0o644
        };
        let mut file = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        std::io::Write::write_all(&mut file, pem.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// An existing PKI (made by [`Pki::generate`]) in `dir`.
    #[must_use]
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    #[must_use]
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `user`'s certificate and key.
    #[must_use]
    pub fn client(&self, user: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{user}.pem")),
            self.dir.join(format!("{user}-key.pem")),
        )
    }

    /// What a client logging in as `user` (by its certificate) needs.
    pub fn access(&self, user: &str) -> anyhow::Result<podnet::datastore::etcd::EtcdAccess> {
        let (cert, key) = self.client(user);
        Ok(podnet::datastore::etcd::EtcdAccess::load(
            &podnet::datastore::etcd::EtcdAccessFiles {
                ca: Some(self.ca()),
                cert: Some(cert),
                key: Some(key),
                ..Default::default()
            },
        )?)
    }

    /// etcd's flags for serving clients over TLS and requiring a client
    /// certificate signed by this CA.
    #[must_use]
    pub fn etcd_server_args(&self) -> Vec<String> {
        vec![
            "--client-cert-auth".into(),
            format!("--trusted-ca-file={}", self.ca().display()),
            format!("--cert-file={}", self.dir.join("server.pem").display()),
            format!("--key-file={}", self.dir.join("server-key.pem").display()),
        ]
    }
}

/// The CA's name and uses (also what an issuer needs later).
fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
    ca.distinguished_name
        .push(DnType::CommonName, "podnet test etcd CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(ca)
}

/// A free loopback TCP port (free when asked: etcd binds it a moment later).
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a port")?;
    Ok(listener.local_addr().context("port")?.port())
}

/// An etcd on loopback, serving clients over TLS with `--client-cert-auth`,
/// in a temporary directory (data, certificates, log). Dropping it kills
/// etcd and removes the directory.
pub struct LocalEtcd {
    child: Child,
    pub dir: PathBuf,
    pub pki: Pki,
    /// `https://127.0.0.1:<port>`.
    pub endpoint: String,
}

impl LocalEtcd {
    /// Starts etcd (`/usr/bin/etcd`, installed by `cargo xtask setup`) with
    /// client certificates `users` made for it, and waits until `root`-less
    /// TLS connections are answered (auth is not on yet).
    pub fn start(tag: &str, users: &[&str]) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("podnet-etcd-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // From here on the guard owns the directory.
        let mut guard = DirGuard(Some(dir.clone()));
        let pki = Pki::generate(&dir.join("pki"), &[Ipv4Addr::LOCALHOST], users)?;
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let endpoint = format!("https://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = fs::File::create(dir.join("etcd.log")).context("etcd log")?;
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(pki.etcd_server_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting etcd (etcd-server is installed by `cargo xtask setup`)")?;
        guard.0 = None;
        let etcd = Self {
            child,
            dir,
            pki,
            endpoint,
        };
        etcd.wait_ready(Duration::from_secs(20))?;
        Ok(etcd)
    }

    fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let access = self.pki.access("root")?;
        let endpoint = self.endpoint.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("runtime")?;
        loop {
            let result = runtime.block_on(podnet::datastore::etcd::EtcdDatastore::connect_one(
                &endpoint,
                Duration::from_secs(10),
                &access,
            ));
            match result {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    let log = fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
                    let tail: String = log.lines().rev().take(15).collect::<Vec<_>>().join("\n");
                    anyhow::bail!(
                        "etcd at {endpoint} did not serve: {e}; log (last lines first):\n{tail}"
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Removes a directory unless disarmed (`.0 = None`).
struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// True when etcd is installed; otherwise skips loudly (with
/// [`crate::ALLOW_SKIP_ENV`]) or fails: the test never passes without
/// having run.
#[must_use]
pub fn etcd_installed(test: &str) -> bool {
    let found = Command::new("etcd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return true;
    }
    assert!(
        std::env::var_os(crate::ALLOW_SKIP_ENV).is_some(),
        "{test} needs etcd (`cargo xtask setup` installs etcd-server); set {}=1 to skip",
        crate::ALLOW_SKIP_ENV
    );
    eprintln!("SKIPPED(etcd) {test}: etcd is not installed");
    false
}
