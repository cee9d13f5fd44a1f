//! The webhook's TLS, looked after by the operator.
//!
//! One writer: the leader keeps a CA and a serving certificate for the webhook Service in a
//! Secret (`kubernetes.io/tls` keys `tls.crt`, `tls.key`, `ca.crt`, plus `ca.key`), renews the
//! serving certificate `renew_before` its expiry (and the CA the same way, trusting old and new
//! CA while both are valid), and keeps the `caBundle` of the MutatingWebhookConfiguration's
//! webhooks that call this Service current, by server-side apply. Every replica watches the
//! Secret and serves its current certificate ([`CertStore`] resolves it per handshake), so a
//! renewal needs no restart and drops no connection. With cert-manager the Secret comes from it
//! and the operator only reads it (and leaves the `caBundle` to cert-manager's CA injector).

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwapOption;
use futures::StreamExt;
use k8s_openapi::{
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret},
    ByteString,
};
use kube::{
    api::{Patch, PatchParams},
    runtime::{watcher, WatchStreamExt},
    Api, Client,
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde_json::json;
use tracing::{info, warn};

use super::{reconcile::MANAGER, ApiError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("Secret {secret}: {what}")]
    Invalid { secret: String, what: String },
    #[error(transparent)]
    Kube(#[from] ApiError),
}

/// Where the webhook's certificate comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CertSource {
    /// The leader creates, renews and publishes it (default).
    Operator,
    /// cert-manager writes the Secret and injects the caBundle; the operator only reads it.
    CertManager,
}

/// The webhook's TLS settings.
#[derive(Clone, Debug)]
pub struct TlsOptions {
    /// Namespace of the Secret and of the webhook Service (the operator's own).
    pub namespace: String,
    /// The webhook Service: the certificate is for `<service>.<namespace>.svc`.
    pub service: String,
    pub secret: String,
    /// The MutatingWebhookConfiguration whose webhooks calling `service` get the `caBundle`.
    pub webhook_config: String,
    pub source: CertSource,
    /// Lifetime of a serving certificate; the CA lives ten times as long.
    pub lifetime: Duration,
    /// Renew this long before expiry.
    pub renew_before: Duration,
}

impl TlsOptions {
    pub fn dns_names(&self) -> Vec<String> {
        let (s, ns) = (&self.service, &self.namespace);
        vec![
            format!("{s}.{ns}.svc"),
            format!("{s}.{ns}.svc.cluster.local"),
            format!("{s}.{ns}"),
            s.clone(),
        ]
    }

    fn secret_ref(&self) -> String {
        format!("{}/{}", self.namespace, self.secret)
    }

    /// How often the leader looks at the Secret.
    fn check_every(&self) -> Duration {
        (self.renew_before / 4).clamp(Duration::from_millis(100), Duration::from_secs(60))
    }
}

// === the certificates ===

/// PEM texts, as kept in the Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// Every trusted CA (the current one first; during a CA rotation the old one too).
    pub ca_pem: String,
    pub ca_key_pem: Option<String>,
    pub cert_pem: String,
    pub key_pem: String,
}

fn validity(lifetime: Duration) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks that disagree.
    let from = now - time::Duration::minutes(5);
    (from, now + lifetime)
}

/// A new CA (PEM certificate and key).
pub fn new_ca(lifetime: Duration) -> Result<(String, String), Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "detour webhook CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (params.not_before, params.not_after) = validity(lifetime);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A serving certificate for `dns_names`, signed by the CA (the first certificate of `ca_pem`).
pub fn new_serving_cert(
    ca_pem: &str,
    ca_key_pem: &str,
    dns_names: Vec<String>,
    lifetime: Duration,
) -> Result<(String, String), Error> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let first_ca = first_pem(ca_pem).ok_or(rcgen::Error::CouldNotParseCertificate)?;
    let issuer = Issuer::from_ca_cert_pem(&first_ca, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(dns_names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "detour webhook");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    (params.not_before, params.not_after) = validity(lifetime);
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn first_pem(pems: &str) -> Option<String> {
    let end = "-----END CERTIFICATE-----";
    let at = pems.find(end)?;
    Some(pems[..at + end.len()].trim_start().to_string() + "\n")
}

/// Expiry of every certificate in `pem` (in order).
pub fn not_after(pem: &str) -> Option<Vec<SystemTime>> {
    let mut out = Vec::new();
    for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let der = der.ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
        let secs = cert.validity().not_after.timestamp();
        out.push(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?));
    }
    (!out.is_empty()).then_some(out)
}

/// The DNS names a certificate is for.
fn dns_names_of(pem: &str) -> Vec<String> {
    let Some(Ok(der)) = CertificateDer::pem_slice_iter(pem.as_bytes()).next() else {
        return Vec::new();
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect()
}

/// The certificate chain and key as rustls serves them; checks that they belong together.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.crt: {e}"))?;
    if chain.is_empty() {
        return Err("tls.crt holds no certificate".into());
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("tls.key: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    let ck = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| format!("tls.crt and tls.key: {e}"))?;
    ck.keys_match()
        .map_err(|e| format!("tls.key does not belong to tls.crt: {e}"))?;
    Ok(ck)
}

impl Bundle {
    fn from_secret(s: &Secret, name: &str) -> Result<Bundle, Error> {
        let data = s.data.clone().unwrap_or_default();
        let get = |k: &str| {
            data.get(k)
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .filter(|v| !v.trim().is_empty())
        };
        let missing = |k: &str| Error::Invalid {
            secret: name.to_string(),
            what: format!("no {k}"),
        };
        Ok(Bundle {
            ca_pem: get("ca.crt").ok_or_else(|| missing("ca.crt"))?,
            ca_key_pem: get("ca.key"),
            cert_pem: get("tls.crt").ok_or_else(|| missing("tls.crt"))?,
            key_pem: get("tls.key").ok_or_else(|| missing("tls.key"))?,
        })
    }

    /// What the leader must do to this bundle now, if anything: `None` when it is good.
    fn renewed(&self, opts: &TlsOptions, now: SystemTime) -> Result<Option<Bundle>, Error> {
        let due = |t: SystemTime| t <= now + opts.renew_before;
        let ca_expiry = not_after(&self.ca_pem).and_then(|v| v.first().copied());
        let (ca_pem, ca_key) = match (&self.ca_key_pem, ca_expiry) {
            (Some(key), Some(exp)) if !due(exp) => (self.ca_pem.clone(), key.clone()),
            (_, old) => {
                let (ca, key) = new_ca(opts.lifetime * 10)?;
                // Keep trusting the old CA while it is valid: serving certificates it signed
                // are still in use until every replica has the new one.
                let old_first = old
                    .filter(|e| *e > now)
                    .and_then(|_| first_pem(&self.ca_pem));
                let bundle = match old_first {
                    Some(old) => format!("{ca}{old}"),
                    None => ca,
                };
                info!("new webhook CA");
                return signed_by(bundle, key, opts).map(Some);
            }
        };
        let leaf_ok = not_after(&self.cert_pem)
            .and_then(|v| v.first().copied())
            .is_some_and(|e| !due(e))
            && dns_names_of(&self.cert_pem) == opts.dns_names()
            && certified_key(&self.cert_pem, &self.key_pem).is_ok();
        if leaf_ok {
            return Ok(None);
        }
        signed_by(ca_pem, ca_key, opts).map(Some)
    }

    fn fresh(opts: &TlsOptions) -> Result<Bundle, Error> {
        let (ca_pem, ca_key) = new_ca(opts.lifetime * 10)?;
        signed_by(ca_pem, ca_key, opts)
    }
}

/// A bundle with a new serving certificate signed by the given CA.
fn signed_by(ca_pem: String, ca_key: String, opts: &TlsOptions) -> Result<Bundle, Error> {
    let (cert_pem, key_pem) = new_serving_cert(&ca_pem, &ca_key, opts.dns_names(), opts.lifetime)?;
    Ok(Bundle {
        ca_pem,
        ca_key_pem: Some(ca_key),
        cert_pem,
        key_pem,
    })
}

// === what every replica serves ===

/// The serving certificate of this replica, swapped in place when the Secret changes.
#[derive(Debug, Default)]
pub struct CertStore {
    current: ArcSwapOption<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
    cert_pem: String,
}

impl CertStore {
    /// Loads a certificate and key; a bad pair is refused and the current one kept.
    pub fn load(&self, cert_pem: &str, key_pem: &str) -> Result<bool, String> {
        if self
            .current
            .load()
            .as_ref()
            .is_some_and(|c| c.cert_pem == cert_pem)
        {
            return Ok(false);
        }
        let key = certified_key(cert_pem, key_pem)?;
        let not_after = not_after(cert_pem)
            .and_then(|v| v.first().copied())
            .ok_or("tls.crt: cannot read its expiry")?;
        self.current.store(Some(Arc::new(Loaded {
            key: Arc::new(key),
            not_after,
            cert_pem: cert_pem.to_string(),
        })));
        Ok(true)
    }

    /// A certificate is loaded and has not expired.
    pub fn valid(&self) -> bool {
        self.current
            .load()
            .as_ref()
            .is_some_and(|c| c.not_after > SystemTime::now())
    }

    /// The PEM being served (tests and `/ready`).
    pub fn serving_pem(&self) -> Option<String> {
        self.current.load().as_ref().map(|c| c.cert_pem.clone())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|c| c.key.clone())
    }
}

/// Every replica: follows the Secret and loads each new certificate into `store`. A deleted or
/// broken Secret leaves the current certificate serving.
pub async fn follow_secret(client: Client, opts: TlsOptions, store: Arc<CertStore>) {
    let api: Api<Secret> = Api::namespaced(client, &opts.namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={}", opts.secret));
    let mut events = watcher(api, cfg)
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(ev) = events.next().await {
        match ev {
            Ok(secret) => match Bundle::from_secret(&secret, &opts.secret_ref()) {
                Ok(b) => match store.load(&b.cert_pem, &b.key_pem) {
                    Ok(true) => {
                        info!(secret = %opts.secret_ref(), "serving a new webhook certificate")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        warn!(secret = %opts.secret_ref(), error = %e, "webhook certificate refused; the current one keeps serving")
                    }
                },
                Err(e) => warn!(error = %e, "webhook certificate not usable yet"),
            },
            Err(e) => warn!(error = %e, "watching the webhook Secret"),
        }
    }
}

// === what the leader does ===

/// The leader: keeps the Secret's certificates valid and the `caBundle` current, until dropped.
pub async fn maintain(client: Client, opts: TlsOptions) {
    if opts.source == CertSource::CertManager {
        return std::future::pending().await;
    }
    let mut failures = 0u32;
    loop {
        let wait = match maintain_once(&client, &opts).await {
            Ok(()) => {
                failures = 0;
                opts.check_every()
            }
            Err(e) => {
                failures += 1;
                warn!(error = %e, "webhook certificate upkeep failed; retrying");
                super::reconcile::backoff(failures).min(opts.check_every())
            }
        };
        tokio::time::sleep(wait).await;
    }
}

async fn maintain_once(client: &Client, opts: &TlsOptions) -> Result<(), Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &opts.namespace);
    let current = secrets
        .get_opt(&opts.secret)
        .await
        .map_err(ApiError::of("get", format!("secret {}", opts.secret_ref())))?;
    let existing = current
        .as_ref()
        .and_then(|s| Bundle::from_secret(s, &opts.secret_ref()).ok());
    let bundle = match &existing {
        Some(b) => b.renewed(opts, SystemTime::now())?,
        None => Some(Bundle::fresh(opts)?),
    };
    let bundle = match bundle {
        Some(b) => {
            // A new CA is trusted by the API server before any certificate it signed is served.
            if existing.as_ref().is_none_or(|e| e.ca_pem != b.ca_pem) {
                publish_ca_bundle(client, opts, &b.ca_pem).await?;
            }
            let data = |s: &str| ByteString(s.as_bytes().to_vec());
            let mut map = std::collections::BTreeMap::from([
                ("ca.crt".to_string(), data(&b.ca_pem)),
                ("tls.crt".to_string(), data(&b.cert_pem)),
                ("tls.key".to_string(), data(&b.key_pem)),
            ]);
            if let Some(k) = &b.ca_key_pem {
                map.insert("ca.key".into(), data(k));
            }
            let body = json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": opts.secret,
                    "namespace": opts.namespace,
                    "labels": { super::reconcile::MANAGED_BY.0: super::reconcile::MANAGED_BY.1 },
                },
                "type": "kubernetes.io/tls",
                "data": map,
            });
            secrets
                .patch(
                    &opts.secret,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&body),
                )
                .await
                .map_err(ApiError::of(
                    "apply",
                    format!("secret {}", opts.secret_ref()),
                ))?;
            info!(secret = %opts.secret_ref(), "webhook certificate issued");
            b
        }
        None => existing.expect("renewed only from an existing bundle"),
    };
    publish_ca_bundle(client, opts, &bundle.ca_pem).await
}

/// Sets `caBundle` on each webhook of the configuration that calls our Service, when it differs.
async fn publish_ca_bundle(client: &Client, opts: &TlsOptions, ca_pem: &str) -> Result<(), Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let target = format!("mutatingwebhookconfiguration {}", opts.webhook_config);
    let Some(cfg) = api
        .get_opt(&opts.webhook_config)
        .await
        .map_err(ApiError::of("get", target.clone()))?
    else {
        // Not installed (yet): nothing calls us.
        return Ok(());
    };
    let want = ByteString(ca_pem.as_bytes().to_vec());
    let ours: Vec<_> = cfg
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .filter(|w| {
            w.client_config
                .service
                .as_ref()
                .is_some_and(|s| s.name == opts.service && s.namespace == opts.namespace)
        })
        .collect();
    if ours
        .iter()
        .all(|w| w.client_config.ca_bundle.as_ref() == Some(&want))
    {
        return Ok(());
    }
    // Every webhook of ours in each apply: server-side apply removes what this manager applied
    // before and leaves out now, so applying only the stale ones would strip the others.
    let stale: Vec<String> = ours.into_iter().map(|w| w.name).collect();
    let body = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": opts.webhook_config },
        "webhooks": stale.iter().map(|name| json!({
            "name": name,
            "clientConfig": { "caBundle": want },
        })).collect::<Vec<_>>(),
    });
    api.patch(
        &opts.webhook_config,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(ApiError::of("apply", target))?;
    info!(webhooks = ?stale, "published the webhook caBundle");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(lifetime: Duration, renew_before: Duration) -> TlsOptions {
        TlsOptions {
            namespace: "detour-system".into(),
            service: "detour-webhook".into(),
            secret: "detour-webhook-tls".into(),
            webhook_config: "detour-injector".into(),
            source: CertSource::Operator,
            lifetime,
            renew_before,
        }
    }

    #[test]
    fn a_fresh_bundle_serves_the_service_names_and_chains_to_its_ca() {
        let o = opts(Duration::from_secs(3600), Duration::from_secs(600));
        let b = Bundle::fresh(&o).unwrap();
        assert_eq!(dns_names_of(&b.cert_pem), o.dns_names());
        certified_key(&b.cert_pem, &b.key_pem).unwrap();
        let exp = not_after(&b.cert_pem).unwrap()[0];
        let left = exp.duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600));
        let ca_left = not_after(&b.ca_pem).unwrap()[0]
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(
            ca_left > Duration::from_secs(35_000),
            "the CA outlives its certificates"
        );
        // Verifies against the CA, as an API server does with the caBundle.
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(b.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        use rustls::client::danger::ServerCertVerifier;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let leaf = CertificateDer::pem_slice_iter(b.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let name =
            rustls::pki_types::ServerName::try_from("detour-webhook.detour-system.svc").unwrap();
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], rustls::pki_types::UnixTime::now())
            .expect("the serving certificate chains to the CA for the Service name");
    }

    #[test]
    fn renewal_is_due_only_within_renew_before_and_keeps_the_ca() {
        let o = opts(Duration::from_secs(3600), Duration::from_secs(600));
        let b = Bundle::fresh(&o).unwrap();
        let now = SystemTime::now();
        assert_eq!(b.renewed(&o, now).unwrap(), None, "fresh: nothing to do");
        let later = now + Duration::from_secs(3100);
        let r = b
            .renewed(&o, later)
            .unwrap()
            .expect("due 10 minutes before expiry");
        assert_eq!(r.ca_pem, b.ca_pem, "the CA stays");
        assert_ne!(r.cert_pem, b.cert_pem);
        // Another Service name: a new certificate.
        let mut other = o.clone();
        other.service = "other".into();
        assert!(b.renewed(&other, now).unwrap().is_some());
    }

    #[test]
    fn a_ca_near_its_end_is_replaced_and_the_old_one_still_trusted() {
        let o = opts(Duration::from_secs(100), Duration::from_secs(50));
        let b = Bundle::fresh(&o).unwrap();
        // The CA lives 1000 s: at +960 s it is due, still valid.
        let r = b
            .renewed(&o, SystemTime::now() + Duration::from_secs(960))
            .unwrap()
            .expect("due");
        let cas = not_after(&r.ca_pem).unwrap();
        assert_eq!(cas.len(), 2, "new CA first, then the old one");
        assert!(r.ca_pem.ends_with(&first_pem(&b.ca_pem).unwrap()));
    }

    #[test]
    fn the_store_keeps_a_good_certificate_over_a_bad_one() {
        let o = opts(Duration::from_secs(3600), Duration::from_secs(600));
        let b = Bundle::fresh(&o).unwrap();
        let store = CertStore::default();
        assert!(!store.valid());
        assert!(store.load(&b.cert_pem, &b.key_pem).unwrap());
        assert!(
            !store.load(&b.cert_pem, &b.key_pem).unwrap(),
            "the same one again"
        );
        let other = Bundle::fresh(&o).unwrap();
        assert!(
            store.load(&other.cert_pem, &b.key_pem).is_err(),
            "a key of another cert"
        );
        assert!(store.valid());
        assert_eq!(store.serving_pem().as_deref(), Some(b.cert_pem.as_str()));
    }
}
