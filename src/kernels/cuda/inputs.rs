//! The buffers of a launch: [`prepare`] (shared by the fused and the reference op) plans a batch
//! and gathers its cache into the kernels' layout with candle ops on the device ([`Inputs`]), the
//! queries in f32; [`cuda_storage`] and [`view`] turn tensors into the kernels' typed arguments.

use candle_core::cuda_backend::cudarc::driver::CudaView;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Device, Layout, Result, Storage, Tensor};

use super::limits::Unsupported;
use super::plan::{device_limits, plan, Plan};
use crate::store::SeqLayerStore;

/// The batch's cache in the kernels' layout, as tensors on the device (candle ops only).
pub(super) struct Inputs {
    /// u8 `(n_kv, N, d * kbits / 8)`, f16 params (`(n_kv, N, d / key_group, 2)` per-token,
    /// `(n_kv, N / key_group, d, 2)` per-channel), u8 `(n_kv, N, d * vbits / 8)`, f16
    /// `(n_kv, N, d / value_group, 2)`.
    pub(super) quant: Option<[Tensor; 4]>,
    /// `(n_kv, Nd, d)` K and V in the activation dtype: staged then the policy's rows of each
    /// sequence, sequence after sequence.
    pub(super) dense: Option<[Tensor; 2]>,
}

fn cat1(parts: &[&Tensor]) -> Result<Tensor> {
    match parts {
        [one] => one.contiguous(),
        _ => Tensor::cat(parts, 1)?.contiguous(),
    }
}

fn gather(plan: &Plan, rows: &[SeqLayerStore]) -> Result<Inputs> {
    let quant = match plan.quant {
        None => None,
        Some(qp) => {
            let chunks: Vec<_> = rows.iter().flat_map(|r| r.chunks()).collect();
            let k_codes: Vec<&Tensor> = chunks.iter().map(|c| c.k.codes_tensor()).collect();
            let v_codes: Vec<&Tensor> = chunks.iter().map(|c| c.v.codes_tensor()).collect();
            let v_params: Vec<&Tensor> = chunks.iter().map(|c| c.v.params_tensor()).collect();
            let k_params = if qp.key_per_channel {
                // (n_kv, d, 2) per chunk -> (n_kv, chunks, d, 2).
                let stacked = chunks
                    .iter()
                    .map(|c| c.k.params_tensor().unsqueeze(1))
                    .collect::<Result<Vec<_>>>()?;
                cat1(&stacked.iter().collect::<Vec<_>>())?
            } else {
                cat1(
                    &chunks
                        .iter()
                        .map(|c| c.k.params_tensor())
                        .collect::<Vec<_>>(),
                )?
            };
            Some([cat1(&k_codes)?, k_params, cat1(&v_codes)?, cat1(&v_params)?])
        }
    };
    let dense = match plan.dense {
        None => None,
        Some(_) => {
            let parts: Vec<_> = rows
                .iter()
                .flat_map(|r| [r.staged(), r.full()])
                .flatten()
                .collect();
            let k: Vec<&Tensor> = parts.iter().map(|r| &r.k).collect();
            let v: Vec<&Tensor> = parts.iter().map(|r| &r.v).collect();
            Some([cat1(&k)?, cat1(&v)?])
        }
    };
    Ok(Inputs { quant, dense })
}

/// The CUDA storage of a tensor on the device.
pub(super) fn cuda_storage<'a>(storage: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match storage {
        Storage::Cuda(s) => Ok(s),
        _ => candle_core::bail!("logquant: the {what} are not on a CUDA device"),
    }
}

/// The elements of a contiguous CUDA tensor's storage, as a view for a kernel argument.
pub(super) fn view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("logquant: the {what} are not contiguous");
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// The plan and the gathered inputs of a decode batch, or why the kernel does not take it.
pub(super) fn prepare(
    q: &Tensor,
    rows: &[SeqLayerStore],
) -> Result<std::result::Result<(Plan, Inputs, Tensor), Unsupported>> {
    let Device::Cuda(dev) = q.device() else {
        return Ok(Err(Unsupported::NotCuda));
    };
    let plan = match plan(q.dims4()?, rows, device_limits(dev)?) {
        Ok(plan) => plan,
        Err(reason) => return Ok(Err(reason)),
    };
    let inputs = gather(&plan, rows)?;
    let q32 = q
        .to_dtype(DType::F32)?
        .reshape((plan.batch, plan.n_q, plan.d))?
        .contiguous()?;
    // The offsets are the one host-to-device upload of a call (bookkeeping, not tensor data).
    crate::device_ops::note_upload();
    Ok(Ok((plan, inputs, q32)))
}
