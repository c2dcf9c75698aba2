//! Pickle checkpoints: conversion and scanning, never executing them
//! (`tensafe_pickle`).

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::SafetensorError;

/// Converts a pickle (PyTorch) checkpoint to safetensors without executing
/// it; returns the conversion report as JSON. An `.index.json` input
/// converts a sharded checkpoint into `output` (a directory).
#[pyfunction]
#[pyo3(signature = (input, output, *, key = None, flatten = false, include_optimizer = false, dedupe = false, keep_non_tensors = false, lenient_bool = false))]
#[allow(clippy::too_many_arguments, reason = "mirrors the keyword arguments of tensafe.convert")]
pub(crate) fn convert_pickle(
    py: Python<'_>,
    input: PathBuf,
    output: PathBuf,
    key: Option<String>,
    flatten: bool,
    include_optimizer: bool,
    dedupe: bool,
    keep_non_tensors: bool,
    lenient_bool: bool,
) -> PyResult<String> {
    let mut options = tensafe_pickle::ConvertOptions { dedupe, keep_non_tensors, lenient_bool, ..Default::default() };
    options.extract.key = key;
    options.extract.flatten = flatten;
    options.extract.include_optimizer = include_optimizer;
    py.detach(|| {
        if input.to_string_lossy().ends_with(".json") {
            tensafe_pickle::convert_sharded(&input, &output, &options).map(|r| serde_json::to_string(&r))
        } else {
            tensafe_pickle::convert_file(&input, &output, &options).map(|r| serde_json::to_string(&r))
        }
    })
    // tensafe-pickle's messages escape the names they quote from the input.
    .map_err(|e| SafetensorError::new_err(e.to_string()))?
    .map_err(|e| SafetensorError::new_err(e.to_string()))
}

/// Scans a file for what loading it with pickle would import and call;
/// returns the report as JSON (never raises for hostile content).
#[pyfunction]
pub(crate) fn scan_pickle(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    let report = py.detach(|| tensafe_pickle::scan_file(&path, &Default::default()));
    serde_json::to_string(&report).map_err(|e| SafetensorError::new_err(e.to_string()))
}
