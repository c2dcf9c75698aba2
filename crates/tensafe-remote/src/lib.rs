//! # tensafe-remote
//!
//! safetensors files in object storage and on web servers, read with range
//! requests through the [`object_store`] crate:
//!
//! * [`RemoteFile::open`] reads and validates the header alone, in at most
//!   two range requests (the first [`RemoteOptions::first_read`] bytes, and
//!   the rest of the header only when it is longer).
//! * Tensors, slices ([`tensafe::SlicePlan`]) and whole data sections are
//!   fetched with coalesced, concurrent range requests streamed straight into
//!   the caller's buffer ([`RemoteFile::read_slice_into`],
//!   [`RemoteFile::read_data_into`], [`read_into`] across files), with bounded
//!   concurrency and request sizes, and a progress callback.
//! * Every response must hold exactly the bytes asked for; anything else is
//!   retried, then reported ([`RemoteError::WrongLength`]): never returned.
//! * [`RemoteCheckpoint`] opens a sharded checkpoint (index URL or "directory"
//!   URL ending in `/`) or a single file as one, with the local checks.
//! * [`Counter`] / [`Traffic`] count requests and bytes received, per file,
//!   per caller and per process ([`global_traffic`]).
//! * Writes: [`serialize_to_url`] / [`upload_prepared`] upload the local
//!   writer's exact bytes, streamed from the caller's tensors (one PUT up to
//!   [`RemoteOptions::part_bytes`], else a multipart upload with bounded
//!   memory, aborted on failure: nothing partial is ever visible);
//!   [`save_sharded_to_url`] writes shards then the index under a prefix;
//!   [`reshard`] reads and writes paths or URLs. `http(s)://` is read-only.
//!
//! The API is blocking: the crate owns a small multi-threaded tokio runtime
//! and callers only wait on it, so it can be called from plain threads (and
//! from Python with the GIL released). Calling it from inside an async
//! runtime is an error ([`RemoteError::InsideRuntime`]).
//!
//! ## URLs
//!
//! Schemes are matched in any case ([`RemoteUrl::is_remote`]).
//!
//! | URL | store |
//! |---|---|
//! | `s3://bucket/key`, `s3a://…` | Amazon S3 and S3-compatible stores (MinIO, SeaweedFS, Ceph, R2 …) |
//! | `gs://bucket/key` | Google Cloud Storage |
//! | `az://container/path`, `azure://…`, `adl://…`, `abfs[s]://container/path`, `abfs[s]://container@account.dfs.core.windows.net/path` | Azure Blob Storage / ADLS Gen2 |
//! | `http://host/path`, `https://host/path` | any web server that supports `Range` (always plain HTTP, never signed) |
//!
//! ## Credentials and endpoints: environment variables
//!
//! Read once per store (bucket or host) and process, when first used; see
//! the object_store builders' `from_env` for the complete lists.
//!
//! * S3: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`;
//!   `AWS_REGION` / `AWS_DEFAULT_REGION`; `AWS_ENDPOINT_URL` (or
//!   `AWS_ENDPOINT`) for S3-compatible stores, which are then addressed
//!   path-style (`http://endpoint/bucket/key`) unless
//!   `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`; `AWS_ALLOW_HTTP=true` to allow
//!   an `http://` endpoint; `AWS_SKIP_SIGNATURE=true` for public buckets;
//!   web identity, container and instance credentials as in the AWS SDKs.
//! * GCS: `GOOGLE_APPLICATION_CREDENTIALS` or `GOOGLE_SERVICE_ACCOUNT`
//!   (a service account JSON file), `GOOGLE_SERVICE_ACCOUNT_KEY` (its text);
//!   for an emulator, `GOOGLE_ALLOW_HTTP=true` and a key with
//!   `"disable_oauth": true` and `"gcs_base_url": "http://…"` (skipping
//!   signatures alone still asks the metadata server for a token).
//! * Azure: `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY` or
//!   `AZURE_STORAGE_SAS_KEY`, or `AZURE_CLIENT_ID` / `AZURE_CLIENT_SECRET` /
//!   `AZURE_TENANT_ID`; `AZURE_STORAGE_USE_EMULATOR=true` for Azurite.
//!
//! The same keys, lower-case, can be given in
//! [`RemoteOptions::storage_options`] (`("aws_endpoint", "http://…")`), which
//! take precedence over the environment.
//!
//! ## Errors
//!
//! 404 → [`RemoteError::NotFound`], 401/403 → [`RemoteError::Forbidden`],
//! 416 → [`RemoteError::RangeNotSatisfiable`], a 200 answer to a range
//! request → [`RemoteError::RangeIgnored`] (the body is dropped unread: the
//! connection is closed, so at most what was already in flight is received,
//! never the whole object). 5xx, 429, timeouts and connection resets are
//! retried with exponential backoff ([`RemoteOptions::retry`]); a
//! `Retry-After` in seconds is waited for first (at most
//! [`RemoteOptions::max_retry_after`]); a request still failing after
//! `retry_timeout + timeout` is [`RemoteError::TimedOut`]. A cloud store's
//! redirect to another host is not followed ([`RemoteError::Redirected`]:
//! its requests carry credentials); web servers' redirects are. Text from a
//! server (error bodies, read up to 16 KiB) is shown escaped.

mod checkpoint;
mod client;
mod error;
mod fetch;
mod file;
mod store;
mod traffic;
mod write;

use std::time::Duration;

pub use checkpoint::RemoteCheckpoint;
pub use error::{ClientError, RemoteError, Result};
pub use file::{read_into, read_into_until, RemoteFile, RemoteRange};
pub use object_store::{BackoffConfig, RetryConfig};
pub use store::{RemoteUrl, Scheme};
pub use traffic::{global_traffic, Counter, Traffic};
pub use write::{abort_unfinished_uploads, put_bytes, reshard, save_sharded_to_url, serialize_to_url, upload_prepared};

/// How remote files are read.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Most range requests in flight at once per call (at least 1).
    pub concurrency: usize,
    /// Largest single range request, in bytes.
    pub chunk_bytes: usize,
    /// Wanted ranges of the same object at most this far apart are fetched
    /// with one request (the bytes between them are fetched and dropped).
    pub merge_gap: usize,
    /// Bytes asked for by the first request of [`RemoteFile::open`]; a header
    /// longer than this takes a second request.
    pub first_read: usize,
    /// Retries of failed requests (5xx, 429, timeouts, dropped connections,
    /// bodies of the wrong length) and their backoff. No retry starts after
    /// `retry_timeout`, and a request still failing `retry_timeout +
    /// timeout` after its first try began is given up
    /// ([`RemoteError::TimedOut`]).
    pub retry: RetryConfig,
    /// Longest wait for a whole request (response and body).
    pub timeout: Duration,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// Longest `Retry-After` honoured before a retry.
    pub max_retry_after: Duration,
    /// Uploads: a file up to this many bytes is sent with one PUT; a larger
    /// one as a multipart upload in parts of this size (S3 and GCS want at
    /// least 5 MiB, and at most 10 000 parts: bigger files get bigger
    /// parts), [`RemoteOptions::concurrency`] parts in flight.
    pub part_bytes: usize,
    /// Header size limit and other format options.
    pub read_options: tensafe::ReadOptions,
    /// Extra store settings, as object_store config keys and values
    /// (`aws_endpoint`, `aws_access_key_id`, `aws_allow_http`, `google_service_account`,
    /// `azure_storage_account_name`, …); they override the environment.
    pub storage_options: Vec<(String, String)>,
    /// Counts the traffic of every file opened with these options (clones
    /// share it).
    pub counter: Counter,
}

impl Default for RemoteOptions {
    /// 16 requests of at most 8 MiB in flight (128 MiB), ranges merged across
    /// gaps of up to 1 MiB, a 64 KiB first read, 10 retries within 3 minutes
    /// (backoff from 100 ms to 15 s), 120 s per request, so at most 5 minutes
    /// for a request that keeps failing.
    fn default() -> Self {
        RemoteOptions {
            concurrency: 16,
            chunk_bytes: 8 << 20,
            merge_gap: 1 << 20,
            first_read: 64 << 10,
            retry: RetryConfig::default(),
            timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(10),
            part_bytes: 8 << 20,
            read_options: tensafe::ReadOptions::default(),
            storage_options: Vec::new(),
            counter: Counter::new(),
        }
    }
}
