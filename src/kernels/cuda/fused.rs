//! The fused decode attention: the candle op that launches the quantized spans, the
//! full-precision spans and the reduce of `decode_attention.cu`, and [`attend_decode`], the
//! backend's entry (opt-in with [`ENABLE_ENV`]).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor,
};

use super::inputs::{cuda_storage, prepare, view, Inputs};
use super::limits::{DEFAULT_SMEM, THREADS};
use super::plan::{Plan, DENSE_SPAN};
use super::{MODULE, PTX};
use crate::store::SeqLayerStore;

/// Scratch of one launch: the spans' softmax states and the merged output.
struct Partials {
    /// f32 `(B, n_q, n_slots, d)`, unnormalized outputs.
    out: CudaSlice<f32>,
    /// f32 `(B, n_q, n_slots)`, running max in log2 units and sum.
    max: CudaSlice<f32>,
    sum: CudaSlice<f32>,
}

/// The fused decode attention as a candle op over the queries f32 `(B, n_q, d)`; the output is
/// f32 `(B, n_q, d)`.
struct FusedDecode {
    plan: Plan,
    inputs: Inputs,
    softmax_scale: f32,
}

impl FusedDecode {
    /// Quantized spans: grid `(quant_slots, n_kv, B)`, slots `[0, quant_slots)`.
    fn launch_quant(
        &self,
        dev: &CudaDevice,
        q: &CudaView<'_, f32>,
        offsets: &CudaSlice<i32>,
        parts: &mut Partials,
    ) -> Result<()> {
        let (Some(qp), Some([kc, kp, vc, vp])) = (self.plan.quant, &self.inputs.quant) else {
            return Ok(());
        };
        let p = &self.plan;
        let name = format!(
            "lq_decode_quant_k{}v{}_{}_g{}",
            qp.kbits,
            qp.vbits,
            if qp.key_per_channel { "pc" } else { "pt" },
            p.gt
        );
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        if qp.smem > DEFAULT_SMEM {
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                qp.smem as i32,
            )
            .w()?;
        }
        let (kc_s, kc_l) = kc.storage_and_layout();
        let (kp_s, kp_l) = kp.storage_and_layout();
        let (vc_s, vc_l) = vc.storage_and_layout();
        let (vp_s, vp_l) = vp.storage_and_layout();
        let kc = view::<u8>(cuda_storage(&kc_s, "key codes")?, kc_l, "key codes")?;
        let kp = view::<half::f16>(cuda_storage(&kp_s, "key scales")?, kp_l, "key scales")?;
        let vc = view::<u8>(cuda_storage(&vc_s, "value codes")?, vc_l, "value codes")?;
        let vp = view::<half::f16>(cuda_storage(&vp_s, "value scales")?, vp_l, "value scales")?;
        let b = p.batch;
        let (seq_start, seq_len) = (offsets.slice(0..b), offsets.slice(b..2 * b));
        let head_stride = qp.tokens as i64;
        let (n_q, n_kv, d) = (p.n_q as i32, p.n_kv as i32, p.d as i32);
        let (key_group, value_group) = (qp.key_group as i32, qp.value_group as i32);
        let span = qp.span_tokens as i32;
        let rotated = i32::from(qp.rotated);
        let (n_slots, slot_base) = (p.n_slots() as i32, 0i32);
        let cfg = LaunchConfig {
            grid_dim: (qp.slots as u32, p.n_kv as u32, b as u32),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: qp.smem as u32,
        };
        let mut builder = func.builder();
        builder.arg(q);
        builder.arg(&kc);
        builder.arg(&kp);
        builder.arg(&vc);
        builder.arg(&vp);
        builder.arg(&seq_start);
        builder.arg(&seq_len);
        builder.arg(&head_stride);
        builder.arg(&n_q);
        builder.arg(&n_kv);
        builder.arg(&d);
        builder.arg(&key_group);
        builder.arg(&value_group);
        builder.arg(&span);
        builder.arg(&self.softmax_scale);
        builder.arg(&rotated);
        builder.arg(&mut parts.out);
        builder.arg(&mut parts.max);
        builder.arg(&mut parts.sum);
        builder.arg(&n_slots);
        builder.arg(&slot_base);
        // SAFETY: the arguments are the kernel's parameters in order and type (the `.cu`'s
        // LQ_QUANT_ENTRY); the buffers hold what the plan sized them for and outlive the launch
        // (cudarc records the stream's use of each one).
        unsafe { builder.launch(cfg) }.w()?;
        Ok(())
    }

    /// Full-precision spans: grid `(dense_slots, n_kv, B)`, slots after the quantized ones.
    fn launch_dense(
        &self,
        dev: &CudaDevice,
        q: &CudaView<'_, f32>,
        offsets: &CudaSlice<i32>,
        parts: &mut Partials,
    ) -> Result<()> {
        let (Some((tokens, slots)), Some([k, v])) = (self.plan.dense, &self.inputs.dense) else {
            return Ok(());
        };
        let p = &self.plan;
        let tag = match p.dense_dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            other => candle_core::bail!("logquant: full-precision rows in {other:?}"),
        };
        let func =
            dev.get_or_load_custom_func(&format!("lq_decode_dense_{tag}_g{}", p.gt), MODULE, PTX)?;
        let (k_s, k_l) = k.storage_and_layout();
        let (v_s, v_l) = v.storage_and_layout();
        let (k_s, v_s) = (cuda_storage(&k_s, "keys")?, cuda_storage(&v_s, "values")?);
        let b = p.batch;
        let (dense_start, dense_len) = (offsets.slice(2 * b..3 * b), offsets.slice(3 * b..4 * b));
        let head_stride = tokens as i64;
        let (n_q, n_kv, d) = (p.n_q as i32, p.n_kv as i32, p.d as i32);
        let span = DENSE_SPAN as i32;
        let (n_slots, slot_base) = (p.n_slots() as i32, p.quant_slots() as i32);
        let cfg = LaunchConfig {
            grid_dim: (slots as u32, p.n_kv as u32, b as u32),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: p.dense_smem as u32,
        };
        // One body for the three element types (the views differ in type only).
        macro_rules! launch {
            ($t:ty) => {{
                let k = view::<$t>(k_s, k_l, "keys")?;
                let v = view::<$t>(v_s, v_l, "values")?;
                let mut builder = func.builder();
                builder.arg(q);
                builder.arg(&k);
                builder.arg(&v);
                builder.arg(&dense_start);
                builder.arg(&dense_len);
                builder.arg(&head_stride);
                builder.arg(&n_q);
                builder.arg(&n_kv);
                builder.arg(&d);
                builder.arg(&span);
                builder.arg(&self.softmax_scale);
                builder.arg(&mut parts.out);
                builder.arg(&mut parts.max);
                builder.arg(&mut parts.sum);
                builder.arg(&n_slots);
                builder.arg(&slot_base);
                // SAFETY: as in `launch_quant` (the `.cu`'s LQ_DENSE_ENTRY).
                unsafe { builder.launch(cfg) }.w()?;
            }};
        }
        match p.dense_dtype {
            DType::F32 => launch!(f32),
            DType::F16 => launch!(half::f16),
            _ => launch!(half::bf16),
        }
        Ok(())
    }

    /// Merge of all slots: grid `(n_q, B)`, one thread per channel.
    fn launch_reduce(
        &self,
        dev: &CudaDevice,
        parts: &Partials,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let p = &self.plan;
        let func = dev.get_or_load_custom_func("lq_decode_reduce", MODULE, PTX)?;
        let (n_slots, quant_slots) = (p.n_slots() as i32, p.quant_slots() as i32);
        let d = p.d as i32;
        let rotated = i32::from(p.rotated());
        let cfg = LaunchConfig {
            grid_dim: (p.n_q as u32, p.batch as u32, 1),
            block_dim: (p.d as u32, 1, 1),
            shared_mem_bytes: 4 * p.d as u32,
        };
        let mut builder = func.builder();
        builder.arg(&parts.out);
        builder.arg(&parts.max);
        builder.arg(&parts.sum);
        builder.arg(&n_slots);
        builder.arg(&quant_slots);
        builder.arg(&d);
        builder.arg(&rotated);
        builder.arg(out);
        // SAFETY: the `.cu`'s lq_decode_reduce; `out` holds B * n_q * d floats.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(())
    }
}

impl CustomOp1 for FusedDecode {
    fn name(&self) -> &'static str {
        "logquant-fused-decode-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("logquant: the fused CUDA decode attention runs on CUDA only")
    }

    fn cuda_fwd(&self, q: &CudaStorage, q_layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = q.device().clone();
        let q = view::<f32>(q, q_layout, "queries")?;
        let p = &self.plan;
        let rows = p.batch * p.n_q;
        let n_slots = p.n_slots();
        let offsets = dev.clone_htod(&p.offsets)?;
        // SAFETY (uninitialized scratch and output): every (sequence, query head, slot) gets
        // its max and sum from exactly one span block (the grids cover all slots, and a block
        // past its sequence's end writes max = -inf); the reduce reads part_out only where max
        // is finite, where that block wrote it; the reduce writes every element of `out`.
        let mut parts = Partials {
            out: unsafe { dev.alloc::<f32>(rows * n_slots * p.d)? },
            max: unsafe { dev.alloc::<f32>(rows * n_slots)? },
            sum: unsafe { dev.alloc::<f32>(rows * n_slots)? },
        };
        let mut out = unsafe { dev.alloc::<f32>(rows * p.d)? };
        self.launch_quant(&dev, &q, &offsets, &mut parts)?;
        self.launch_dense(&dev, &q, &offsets, &mut parts)?;
        self.launch_reduce(&dev, &parts, &mut out)?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((p.batch, p.n_q, p.d)),
        ))
    }
}

/// The environment variable that turns the fused CUDA decode attention on
/// (`MISTRALRS_LOGQUANT_CUDA_FUSED=1`).
pub const ENABLE_ENV: &str = "MISTRALRS_LOGQUANT_CUDA_FUSED";

/// Whether the backend uses [`attend_decode`] on CUDA (read once per process). Off by default:
/// the kernels have not yet run on a GPU (scripts/device-check.sh turns them on to check them);
/// until a GPU run passes, CUDA decodes through the portable path.
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var(ENABLE_ENV).is_ok_and(|v| v == "1"))
}

/// Fused decode attention on CUDA over LogQuant stores, one per batch row: the codes are read
/// in place by `decode_attention.cu` (split-K flash decoding, f32 softmax).
///
/// `q` is `(b, q_heads, 1, dim)` on a CUDA device, `rows` the `b` stores of one layer after the
/// new token was admitted, `scale` the softmax scale. Returns the attention output with `q`'s
/// shape and dtype, or `None` where the kernels do not cover the batch
/// ([`Unsupported`](super::Unsupported), logged at debug level): the caller then runs the
/// portable path. Reads nothing back to the host.
pub fn attend_decode(q: &Tensor, rows: &[SeqLayerStore], scale: f32) -> Result<Option<Tensor>> {
    let (plan, inputs, q32) = match prepare(q, rows)? {
        Ok(prepared) => prepared,
        Err(reason) => {
            tracing::debug!("logquant: fused CUDA decode attention not used: {reason}");
            return Ok(None);
        }
    };
    let (b, n_q, d) = (plan.batch, plan.n_q, plan.d);
    let op = FusedDecode {
        plan,
        inputs,
        softmax_scale: scale,
    };
    let out = q32.apply_op1_no_bwd(&op)?;
    Ok(Some(out.reshape((b, n_q, 1, d))?.to_dtype(q.dtype())?))
}
