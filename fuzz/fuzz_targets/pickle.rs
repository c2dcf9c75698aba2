//! Fuzzes the restricted pickle machine and the containers around it.
//!
//! For every input:
//! * the scanner ([`scan_bytes`]) returns a report (never panics), and the
//!   report serializes;
//! * the VM in convert mode, over the raw bytes as a `data.pkl`, returns a
//!   value or an error; when it returns a value, extraction (flattening
//!   everything) returns too;
//! * loading the bytes as a torch checkpoint (zip, legacy stream, …) either
//!   refuses or gives tensors whose planned bytes have exactly the announced
//!   length, which the core writer accepts and reads back unchanged.
//!
//! Limits are lowered so that no single input can take long or allocate much.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tensafe::View;
use tensafe_pickle::value::Heap;
use tensafe_pickle::vm::{Mode, PidSchema, StorageTable, Vm, VmOptions};
use tensafe_pickle::{extract, ConvertOptions, ExtractOptions, Limits, LoadOptions, ScanOptions};

fn limits() -> Limits {
    Limits {
        max_stack: 100_000,
        max_memo: 100_000,
        min_output_budget: 1 << 20,
        max_inflate: 8 << 20,
        max_paths: 100_000,
        ..Default::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = limits();

    let report = tensafe_pickle::scan_bytes(data, "fuzz", &ScanOptions { limits: limits.clone(), ..Default::default() });
    serde_json::to_string(&report).expect("reports serialize");

    let mut heap = Heap::default();
    let mut storages = StorageTable::default();
    let opts = VmOptions { mode: Mode::Convert, pids: PidSchema::Zip, data_only: false, allow_opaque: &[], limits: &limits, no_trailing: true };
    let (outcome, _) = Vm::new("fuzz", data, &mut heap, &mut storages, opts).run();
    assert!(outcome.end <= data.len());
    if let Ok(root) = outcome.result {
        let options = ExtractOptions { flatten: true, include_optimizer: true, ..Default::default() };
        let _ = extract::extract(&heap, &root, &options, &limits);
    }

    let options = ConvertOptions {
        load: LoadOptions { limits: limits.clone(), ..Default::default() },
        extract: ExtractOptions { flatten: true, ..Default::default() },
        ..Default::default()
    };
    let Ok(ck) = tensafe_pickle::load(data, &options.load) else { return };
    let Ok(planned) = tensafe_pickle::plan_checkpoint(&ck, &options) else { return };
    for (name, plan) in &planned.tensors {
        assert_eq!(plan.data().len(), plan.data_len(), "tensor `{name}`");
    }
    let bytes = tensafe::serialize(planned.tensors.iter().map(|(n, p)| (n.as_str(), p)), Some(&planned.metadata))
        .expect("planned tensors are writable");
    let file = tensafe::SafeTensors::deserialize(&bytes).expect("written files read back");
    for (name, plan) in &planned.tensors {
        let view = file.tensor(name).expect("every planned tensor is written");
        assert_eq!(view.data(), &*plan.data(), "tensor `{name}`");
        assert_eq!(view.shape(), plan.shape());
    }
});
