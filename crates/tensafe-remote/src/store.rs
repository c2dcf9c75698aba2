//! URLs → object store clients, and the runtime they run on.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::path::Path;
use object_store::ObjectStore;
use url::Url;

use crate::error::{ClientError, RemoteError, Result};
use crate::client::{self, Redirects};
use crate::traffic::InstrumentedConnector;
use crate::RemoteOptions;

/// The kinds of storage a URL can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `s3://bucket/key` (and `s3a://`): Amazon S3 or an S3-compatible store.
    S3,
    /// `gs://bucket/key`: Google Cloud Storage.
    Gcs,
    /// `az://container/path`, `abfs[s]://container/path` or
    /// `abfs[s]://container@account.dfs.core.windows.net/path`: Azure Blob Storage.
    Azure,
    /// `http://` or `https://`: any web server with range support.
    Http,
}

impl Scheme {
    /// The store a URL scheme names (`s3`, `S3A`, `abfss`, …, in any case):
    /// the one list of the schemes tensafe reads.
    pub fn named(scheme: &str) -> Option<Scheme> {
        match scheme.to_ascii_lowercase().as_str() {
            "s3" | "s3a" => Some(Scheme::S3),
            "gs" => Some(Scheme::Gcs),
            "az" | "abfs" | "abfss" | "azure" | "adl" => Some(Scheme::Azure),
            "http" | "https" => Some(Scheme::Http),
            _ => None,
        }
    }

    /// The store `text` names when it is a URL (a scheme, then `://`).
    pub fn of(text: &str) -> Option<Scheme> {
        text.split_once("://").and_then(|(scheme, _)| Scheme::named(scheme))
    }
}

/// A parsed remote URL: which store, and the object inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteUrl {
    url: Url,
    scheme: Scheme,
    path: Path,
}

impl RemoteUrl {
    /// Parses `s3://`, `s3a://`, `gs://`, `az://`, `azure://`, `adl://`,
    /// `abfs://`, `abfss://`, `http://` and `https://` URLs. `https://` is always plain HTTP, even on
    /// cloud hosts: use the cloud scheme for signed access.
    pub fn parse(text: &str) -> Result<RemoteUrl> {
        let invalid = |reason: &str| RemoteError::InvalidUrl { url: text.to_owned(), reason: reason.to_owned() };
        let url = Url::parse(text).map_err(|e| invalid(&e.to_string()))?;
        let Some(scheme) = Scheme::named(url.scheme()) else {
            return Err(invalid(&format!("unknown scheme `{}`", url.scheme())));
        };
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("no bucket, container or host"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid("query strings and fragments are not supported (pre-signed URLs cannot be used)"));
        }
        let path = Path::from_url_path(url.path()).map_err(|e| invalid(&e.to_string()))?;
        if path.as_ref().is_empty() {
            return Err(invalid("no object path"));
        }
        Ok(RemoteUrl { url, scheme, path })
    }

    /// Whether `text` looks like a URL this crate handles (a scheme it knows,
    /// followed by `://`), as opposed to a local path.
    pub fn is_remote(text: &str) -> bool {
        Scheme::of(text).is_some()
    }

    /// The URL as given (normalized).
    pub fn as_str(&self) -> &str {
        self.url.as_str()
    }

    /// The kind of store.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The object's path inside its bucket, container or server.
    pub fn object_path(&self) -> &Path {
        &self.path
    }

    /// The URL of the file named `file_name` beside this one
    /// (`join("model-00001-of-00002.safetensors")` next to an index file, or
    /// in a "directory" URL ending in `/`). The name is one path segment,
    /// whatever it holds: `%2e%2e`, `a%2Fb`, `?` or `#` are characters of
    /// the name (percent-encoded), never steps out of the directory, another
    /// path or a query. Control characters are refused (URLs drop tabs and
    /// line breaks, so the name would silently become another).
    pub fn join(&self, file_name: &str) -> Result<RemoteUrl> {
        if file_name.chars().any(char::is_control) {
            return Err(RemoteError::InvalidUrl { url: file_name.to_owned(), reason: "a file name with a control character".into() });
        }
        let mut url = self.url.clone();
        url.path_segments_mut()
            .map_err(|()| RemoteError::InvalidUrl { url: self.url.to_string(), reason: "it has no path to put a file name in".into() })?
            .pop()
            .push(file_name);
        RemoteUrl::parse(url.as_str())
    }

    /// `scheme://authority`: what one client serves.
    fn root(&self) -> &str {
        &self.url[..url::Position::BeforePath]
    }
}

impl std::fmt::Display for RemoteUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The runtime every request runs on; callers of the blocking API only wait.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("tensafe-remote")
            .enable_all()
            .build()
            .expect("tensafe-remote: cannot start the I/O runtime")
    })
}

/// Runs `future` to completion on the crate's runtime, from a plain thread.
pub(crate) fn block_on<F: Future>(future: F) -> Result<F::Output> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(RemoteError::InsideRuntime);
    }
    Ok(runtime().block_on(future))
}

/// One client per (store root, settings): connection pools and credential
/// caches are shared by every file opened through it.
static STORES: LazyLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = LazyLock::new(Default::default);

/// The client for `url`, built from the environment and `options` on first use.
pub(crate) fn store_for(url: &RemoteUrl, options: &RemoteOptions) -> Result<Arc<dyn ObjectStore>> {
    let key = format!(
        "{}|{:?}|{:?}|{:?}|{:?}",
        url.root(),
        options.retry,
        options.timeout,
        options.connect_timeout,
        options.storage_options
    );
    let mut stores = STORES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(store) = stores.get(&key) {
        return Ok(store.clone());
    }
    let store = build(url, options).map_err(|source| RemoteError::Config { url: url.to_string(), source: ClientError::new(source) })?;
    stores.insert(key, store.clone());
    Ok(store)
}

fn build(url: &RemoteUrl, options: &RemoteOptions) -> object_store::Result<Arc<dyn ObjectStore>> {
    // Settings common to every client, then the caller's, as config keys
    // ("timeout", "aws_endpoint", …) that each builder parses.
    let mut settings: Vec<(String, String)> = vec![
        ("timeout".into(), format!("{}ms", options.timeout.as_millis())),
        ("connect_timeout".into(), format!("{}ms", options.connect_timeout.as_millis())),
    ];
    if url.url.scheme() == "http" {
        // The user typed http://: no TLS is what they asked for.
        settings.push(("allow_http".into(), "true".into()));
    }
    settings.extend(options.storage_options.iter().cloned());
    let root = url.root();
    // Requests to cloud stores carry credentials: they never follow a
    // redirect to another host. Web servers get none and may send a client
    // anywhere (a CDN).
    let redirects = if url.scheme == Scheme::Http { Redirects::Any } else { Redirects::SameOrigin };
    // The environment the builders read (`from_env`), checked as the settings are.
    let environment = match url.scheme {
        Scheme::S3 => "AWS_",
        Scheme::Gcs => "GOOGLE_",
        Scheme::Azure => "AZURE_",
        Scheme::Http => "",
    };
    if !environment.is_empty() {
        for (key, value) in std::env::vars_os() {
            if let (Some(key), Some(value)) = (key.to_str(), value.to_str())
                && key.starts_with(environment)
            {
                client::check_setting(key, value)?;
            }
        }
    }
    macro_rules! configure {
        ($builder:expr) => {{
            let connector = InstrumentedConnector { redirects };
            let mut builder = $builder.with_url(root).with_retry(options.retry.clone()).with_http_connector(connector);
            for (key, value) in &settings {
                client::check_setting(key, value)?;
                builder = builder.with_config(key.parse()?, value.clone());
            }
            Arc::new(builder.build()?) as Arc<dyn ObjectStore>
        }};
    }
    Ok(match url.scheme {
        Scheme::S3 => configure!(AmazonS3Builder::from_env()),
        Scheme::Gcs => configure!(GoogleCloudStorageBuilder::from_env()),
        Scheme::Azure => configure!(MicrosoftAzureBuilder::from_env()),
        Scheme::Http => configure!(HttpBuilder::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        let u = RemoteUrl::parse("s3://bucket/dir/model-00001-of-00002.safetensors").unwrap();
        assert_eq!((u.scheme(), u.object_path().as_ref()), (Scheme::S3, "dir/model-00001-of-00002.safetensors"));
        assert_eq!(u.root(), "s3://bucket");
        assert_eq!(RemoteUrl::parse("gs://b/x").unwrap().scheme(), Scheme::Gcs);
        let az = RemoteUrl::parse("az://container/a/b").unwrap();
        assert_eq!((az.scheme(), az.object_path().as_ref()), (Scheme::Azure, "a/b"));
        let abfss = RemoteUrl::parse("abfss://fs@account.dfs.core.windows.net/a/b").unwrap();
        assert_eq!((abfss.scheme(), abfss.object_path().as_ref()), (Scheme::Azure, "a/b"));
        let h = RemoteUrl::parse("http://127.0.0.1:8080/files/my%20model.safetensors").unwrap();
        assert_eq!((h.scheme(), h.object_path().as_ref(), h.root()), (Scheme::Http, "files/my model.safetensors", "http://127.0.0.1:8080"));
        assert_eq!(RemoteUrl::parse("https://bucket.s3.amazonaws.com/x").unwrap().scheme(), Scheme::Http);
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for bad in ["ftp://h/x", "s3://bucket", "s3://bucket/", "https://h/x?X-Amz-Signature=1", "model.safetensors", "s3:///x"] {
            let err = RemoteUrl::parse(bad).unwrap_err();
            assert!(matches!(err, RemoteError::InvalidUrl { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn refuses_a_user_agent_it_could_not_send() {
        let url = RemoteUrl::parse("http://127.0.0.1:9/x.safetensors").unwrap();
        let with = |agent: &str| RemoteOptions { storage_options: vec![("user_agent".into(), agent.into())], ..RemoteOptions::default() };
        assert!(store_for(&url, &with("my-tool/1.0")).is_ok());
        let err = store_for(&url, &with("my-tool\r\nX-Injected: 1")).map(drop).unwrap_err();
        assert!(matches!(err, RemoteError::Config { .. }) && err.to_string().contains("user_agent"), "{err}");
    }

    #[test]
    fn tells_urls_from_paths() {
        assert!(RemoteUrl::is_remote("S3://b/k"));
        assert!(RemoteUrl::is_remote("https://h/x"));
        assert!(!RemoteUrl::is_remote("/tmp/model.safetensors"));
        assert!(!RemoteUrl::is_remote("C:\\x"));
        assert!(!RemoteUrl::is_remote("file:///tmp/x"));
    }

    #[test]
    fn joins_relative_names() {
        let index = RemoteUrl::parse("s3://b/ckpt/model.safetensors.index.json").unwrap();
        assert_eq!(index.join("model-00001-of-00002.safetensors").unwrap().as_str(), "s3://b/ckpt/model-00001-of-00002.safetensors");
        let folder = RemoteUrl::parse("https://h/ckpt/").unwrap();
        assert_eq!(folder.join("a.safetensors").unwrap().as_str(), "https://h/ckpt/a.safetensors");
        // A name is one segment whatever it holds: no way out of the folder,
        // into a subfolder, or into a query.
        for (name, object) in [("%2e%2e", "ckpt/%2e%2e"), ("x%2Fy.safetensors", "ckpt/x%2Fy.safetensors"), ("a?b#c", "ckpt/a?b#c")] {
            let joined = index.join(name).unwrap();
            assert_eq!(joined.object_path().as_ref(), object, "{name:?} → {joined:?}");
        }
        assert!(index.join("t\t").is_err() && index.join("a\nb").is_err());
    }
}
