//! The HTTP client under every object store client: object_store's own
//! settings, and a redirect rule of ours.
//!
//! object_store builds its reqwest client with reqwest's default redirect
//! policy, which follows up to ten redirects to any host and drops only the
//! standard credential headers (`Authorization`, cookies) on the way. S3's
//! `x-amz-security-token` and any other signed header would go along to a host
//! a hostile server names. So tensafe builds the client itself, from the same
//! settings (every [`ClientConfigKey`] is read back from the options), with:
//! - [`Redirects::SameOrigin`] for the cloud stores (S3, GCS, Azure), whose
//!   requests carry credentials: a redirect to another scheme, host or port is
//!   not followed, and the caller is told where it pointed;
//! - [`Redirects::Any`] for plain web servers (`http(s)://`), which get no
//!   credentials from tensafe and often redirect to a CDN.
//!
//! object_store is pinned to one version; when it is upgraded, compare this
//! with its `ClientOptions::client`, which this follows setting by setting.

use std::net::ToSocketAddrs;
use std::sync::Arc;

use object_store::{ClientConfigKey, ClientOptions};
use rand::seq::SliceRandom;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Most redirects followed in a row (reqwest's default).
const MAX_REDIRECTS: usize = 10;

/// Which redirects a client follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Redirects {
    /// Only to the same scheme, host and port.
    SameOrigin,
    /// To any host (up to [`MAX_REDIRECTS`] in a row), as browsers do.
    Any,
}

/// The client object_store would build from `options`, with `redirects`.
pub(crate) fn build(options: &ClientOptions, redirects: Redirects) -> object_store::Result<reqwest::Client> {
    let text = |key: ClientConfigKey| options.get_config_value(&key);
    let flag = |key: ClientConfigKey| text(key).map_or(Ok(false), |v| parse_bool(&v));
    let duration = |key: ClientConfigKey| text(key).map(|v| humantime::parse_duration(&v).map_err(|e| invalid(key, &v, e))).transpose();
    let number = |key: ClientConfigKey| text(key).map(|v| v.parse::<usize>().map_err(|e| invalid(key, &v, e))).transpose();

    let mut builder = reqwest::ClientBuilder::new()
        .user_agent(text(ClientConfigKey::UserAgent).unwrap_or_else(|| concat!("tensafe/", env!("CARGO_PKG_VERSION")).to_owned()))
        // No transparent decompression: object sizes come from Content-Length.
        .no_gzip()
        .no_brotli()
        .no_zstd()
        .no_deflate()
        .https_only(!flag(ClientConfigKey::AllowHttp)?)
        .redirect(match redirects {
            Redirects::Any => reqwest::redirect::Policy::limited(MAX_REDIRECTS),
            Redirects::SameOrigin => reqwest::redirect::Policy::custom(|attempt| {
                let first = attempt.previous().first().map(url::Url::origin);
                if first.is_some_and(|origin| origin == attempt.url().origin()) && attempt.previous().len() <= MAX_REDIRECTS {
                    attempt.follow()
                } else {
                    // The 3xx answer goes back to the caller, which reports it.
                    attempt.stop()
                }
            }),
        });
    if let Some(proxy_url) = text(ClientConfigKey::ProxyUrl) {
        let mut proxy = reqwest::Proxy::all(&proxy_url).map_err(client_error)?;
        if let Some(pem) = text(ClientConfigKey::ProxyCaCertificate) {
            builder = builder.add_root_certificate(reqwest::tls::Certificate::from_pem(pem.as_bytes()).map_err(client_error)?);
        }
        if let Some(excludes) = text(ClientConfigKey::ProxyExcludes) {
            proxy = proxy.no_proxy(reqwest::NoProxy::from_string(&excludes));
        }
        builder = builder.proxy(proxy);
    }
    if let Some(timeout) = duration(ClientConfigKey::Timeout)? {
        builder = builder.timeout(timeout);
    }
    if let Some(timeout) = duration(ClientConfigKey::ConnectTimeout)? {
        builder = builder.connect_timeout(timeout);
    }
    if let Some(timeout) = duration(ClientConfigKey::PoolIdleTimeout)? {
        builder = builder.pool_idle_timeout(timeout);
    }
    if let Some(max) = number(ClientConfigKey::PoolMaxIdlePerHost)? {
        builder = builder.pool_max_idle_per_host(max);
    }
    if let Some(interval) = duration(ClientConfigKey::Http2KeepAliveInterval)? {
        builder = builder.http2_keep_alive_interval(interval);
    }
    if let Some(timeout) = duration(ClientConfigKey::Http2KeepAliveTimeout)? {
        builder = builder.http2_keep_alive_timeout(timeout);
    }
    if flag(ClientConfigKey::Http2KeepAliveWhileIdle)? {
        builder = builder.http2_keep_alive_while_idle(true);
    }
    if let Some(size) = number(ClientConfigKey::Http2MaxFrameSize)? {
        let size = u32::try_from(size).map_err(|e| invalid(ClientConfigKey::Http2MaxFrameSize, &size.to_string(), e))?;
        builder = builder.http2_max_frame_size(Some(size));
    }
    if flag(ClientConfigKey::Http1Only)? {
        builder = builder.http1_only();
    }
    if flag(ClientConfigKey::Http2Only)? {
        builder = builder.http2_prior_knowledge();
    }
    if flag(ClientConfigKey::AllowInvalidCertificates)? {
        builder = builder.danger_accept_invalid_certs(true);
    }
    if flag(ClientConfigKey::RandomizeAddresses)? {
        builder = builder.dns_resolver(Arc::new(ShuffledAddresses));
    }
    builder.build().map_err(client_error)
}

/// Refuses a setting that object_store would accept and then drop: a user
/// agent that cannot be sent as a header is forgotten, and its default sent
/// instead, without a word.
pub(crate) fn check_setting(key: &str, value: &str) -> object_store::Result<()> {
    // The stores' own spellings (`aws_user_agent`, and the AWS_*, GOOGLE_*
    // and AZURE_* variables, lowercased) name the same client setting.
    let key = key.to_ascii_lowercase();
    let client_key = ["aws_", "google_", "azure_"].iter().find_map(|prefix| key.strip_prefix(prefix)).unwrap_or(&key);
    match client_key.parse::<ClientConfigKey>() {
        Ok(ClientConfigKey::UserAgent) => match reqwest::header::HeaderValue::from_str(value) {
            Ok(_) => Ok(()),
            Err(e) => Err(invalid(ClientConfigKey::UserAgent, value, e)),
        },
        _ => Ok(()),
    }
}

/// A boolean setting, spelled as object_store accepts it.
fn parse_bool(value: &str) -> object_store::Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" | "y" => Ok(true),
        "0" | "false" | "off" | "no" | "n" => Ok(false),
        _ => Err(object_store::Error::Generic { store: "Config", source: format!("cannot read {value:?} as true or false").into() }),
    }
}

fn invalid(key: ClientConfigKey, value: &str, e: impl std::fmt::Display) -> object_store::Error {
    object_store::Error::Generic { store: "Config", source: format!("{}: cannot read {value:?}: {e}", key.as_ref()).into() }
}

fn client_error(e: reqwest::Error) -> object_store::Error {
    object_store::Error::Generic { store: "HTTP client", source: Box::new(e) }
}

/// Resolves names to all their addresses in random order, so that many
/// clients spread over a store's front ends (object_store's default).
#[derive(Debug)]
struct ShuffledAddresses;

impl Resolve for ShuffledAddresses {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let lookup = tokio::task::spawn_blocking(move || {
                let mut addresses: Vec<_> = (name.as_str(), 0).to_socket_addrs()?.collect();
                addresses.shuffle(&mut rand::rng());
                Ok::<_, std::io::Error>(addresses)
            });
            let addresses = lookup.await.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)??;
            Ok(Box::new(addresses.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_settings_as_object_store_does() {
        assert!(parse_bool("Yes").unwrap() && !parse_bool("0").unwrap() && parse_bool("maybe").is_err());
        let options = ClientOptions::new().with_config(ClientConfigKey::Timeout, "soon");
        let err = build(&options, Redirects::Any).unwrap_err().to_string();
        assert!(err.contains("timeout") && err.contains("soon"), "{err}");
        let options = ClientOptions::new()
            .with_config(ClientConfigKey::Timeout, "30s")
            .with_config(ClientConfigKey::PoolMaxIdlePerHost, "4")
            .with_config(ClientConfigKey::AllowHttp, "true");
        assert!(build(&options, Redirects::SameOrigin).is_ok());
        let options = ClientOptions::new().with_config(ClientConfigKey::PoolMaxIdlePerHost, "many");
        assert!(build(&options, Redirects::SameOrigin).is_err());
        assert!(check_setting("user_agent", "my-tool/1.0").is_ok() && check_setting("timeout", "\n").is_ok());
        assert!(check_setting("aws_user_agent", "a\nb").is_err() && check_setting("AZURE_USER_AGENT", "a\nb").is_err());
        let err = check_setting("user_agent", "my-tool\n1.0").unwrap_err().to_string();
        assert!(err.contains("user_agent") && err.contains("my-tool\\n1.0"), "{err}");
    }
}
