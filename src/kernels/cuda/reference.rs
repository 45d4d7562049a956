//! The reference kernels of `decode_attention.cu` (dequantize into scratch, rotate back, textbook
//! attention) as a candle op, and [`reference_decode_attention`], the on-device oracle of the
//! tests.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::inputs::{cuda_storage, prepare, view, Inputs};
use super::plan::Plan;
use super::{MODULE, PTX};
use crate::store::SeqLayerStore;

/// Reference kernels: a grid-stride loop over elements.
const REF_BLOCKS: u32 = 1024;

/// The reference kernels of `decode_attention.cu` (the on-device oracle): dequantize into
/// scratch, rotate back, textbook attention. Same inputs as the fused op (`fused.rs`'s
/// `FusedDecode`), the full-precision rows in f32.
struct ReferenceDecode {
    plan: Plan,
    inputs: Inputs,
    softmax_scale: f32,
}

impl CustomOp1 for ReferenceDecode {
    fn name(&self) -> &'static str {
        "logquant-reference-decode-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("logquant: the reference CUDA decode attention runs on CUDA only")
    }

    fn cuda_fwd(&self, q: &CudaStorage, q_layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = q.device().clone();
        let q = view::<f32>(q, q_layout, "queries")?;
        let p = &self.plan;
        let (n_kv, d) = (p.n_kv as i32, p.d as i32);
        let b = p.batch;
        let offsets = dev.clone_htod(&p.offsets)?;
        let (q_start, q_len) = (offsets.slice(0..b), offsets.slice(b..2 * b));
        let (d_start, d_len) = (offsets.slice(2 * b..3 * b), offsets.slice(3 * b..4 * b));
        let grid = LaunchConfig {
            grid_dim: (REF_BLOCKS, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // Quantized rows dequantized (and rotated back) into f32 (n_kv, nq, d); one zero row
        // when there are none (lengths 0: never read).
        let nq = p.quant.map_or(1, |qp| qp.tokens);
        let mut kq = dev.alloc_zeros::<f32>(p.n_kv * nq * p.d)?;
        let mut vq = dev.alloc_zeros::<f32>(p.n_kv * nq * p.d)?;
        if let (Some(qp), Some([kc, kp, vc, vp])) = (p.quant, &self.inputs.quant) {
            let dequant = dev.get_or_load_custom_func("lq_ref_dequant", MODULE, PTX)?;
            let encodings = [
                (kc, kp, qp.kbits, qp.key_per_channel, qp.key_group, &mut kq),
                (vc, vp, qp.vbits, false, qp.value_group, &mut vq),
            ];
            for (codes, params, bits, per_channel, group, out) in encodings {
                let (c_s, c_l) = codes.storage_and_layout();
                let (p_s, p_l) = params.storage_and_layout();
                let codes = view::<u8>(cuda_storage(&c_s, "codes")?, c_l, "codes")?;
                let params = view::<half::f16>(cuda_storage(&p_s, "scales")?, p_l, "scales")?;
                let (bits, per_channel, group) =
                    (bits as i32, i32::from(per_channel), group as i32);
                let n_tokens = nq as i64;
                let mut builder = dequant.builder();
                builder.arg(&codes);
                builder.arg(&params);
                builder.arg(&bits);
                builder.arg(&per_channel);
                builder.arg(&group);
                builder.arg(&n_tokens);
                builder.arg(&n_kv);
                builder.arg(&d);
                builder.arg(out);
                // SAFETY: the `.cu`'s lq_ref_dequant; `out` holds n_kv * nq * d floats.
                unsafe { builder.launch(grid) }.w()?;
            }
            if qp.rotated {
                let rotate = dev.get_or_load_custom_func("lq_ref_rotate_rows", MODULE, PTX)?;
                let rows = (p.n_kv * nq) as i64;
                for x in [&mut kq, &mut vq] {
                    let mut y = dev.alloc_zeros::<f32>(p.n_kv * nq * p.d)?;
                    let mut builder = rotate.builder();
                    builder.arg(&*x);
                    builder.arg(&mut y);
                    builder.arg(&rows);
                    builder.arg(&d);
                    // SAFETY: the `.cu`'s lq_ref_rotate_rows, out of place, equal sizes.
                    unsafe { builder.launch(grid) }.w()?;
                    *x = y;
                }
            }
        }
        // Full-precision rows in f32 (converted by `reference_decode_attention`), or one zero
        // row when there are none.
        let nd = p.dense.map_or(1, |(tokens, _)| tokens);
        let zeros = dev.alloc_zeros::<f32>(p.n_kv * p.d)?;
        let dense = self
            .inputs
            .dense
            .as_ref()
            .map(|[k, v]| (k.storage_and_layout(), v.storage_and_layout()));
        let (kd, vd) = match &dense {
            Some(((k_s, k_l), (v_s, v_l))) => (
                view::<f32>(cuda_storage(k_s, "keys")?, k_l, "keys")?,
                view::<f32>(cuda_storage(v_s, "values")?, v_l, "values")?,
            ),
            None => (zeros.slice(..), zeros.slice(..)),
        };
        let mut out = dev.alloc_zeros::<f32>(b * p.n_q * p.d)?;
        let attention = dev.get_or_load_custom_func("lq_ref_attention", MODULE, PTX)?;
        let (nq, nd) = (nq as i64, nd as i64);
        let (batch, n_q) = (b as i32, p.n_q as i32);
        let mut builder = attention.builder();
        builder.arg(&q);
        builder.arg(&kq);
        builder.arg(&vq);
        builder.arg(&q_start);
        builder.arg(&q_len);
        builder.arg(&nq);
        builder.arg(&kd);
        builder.arg(&vd);
        builder.arg(&d_start);
        builder.arg(&d_len);
        builder.arg(&nd);
        builder.arg(&batch);
        builder.arg(&n_q);
        builder.arg(&n_kv);
        builder.arg(&d);
        builder.arg(&self.softmax_scale);
        builder.arg(&mut out);
        // SAFETY: the `.cu`'s lq_ref_attention; `out` holds B * n_q * d floats.
        unsafe {
            builder.launch(LaunchConfig {
                block_dim: (128, 1, 1),
                ..grid
            })
        }
        .w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((b, p.n_q, p.d)),
        ))
    }
}

/// [`attend_decode`](super::attend_decode) through the reference kernels of
/// `decode_attention.cu` (dequantize into scratch, rotate back, textbook attention, one thread
/// per output element): the on-device oracle for tests. Same arguments and result; an error
/// where the fused kernels would not take the batch.
pub fn reference_decode_attention(
    q: &Tensor,
    rows: &[SeqLayerStore],
    scale: f32,
) -> Result<Tensor> {
    let (plan, mut inputs, q32) = prepare(q, rows)?
        .map_err(|reason| candle_core::Error::Msg(format!("logquant: {reason}")))?;
    if let Some([k, v]) = &inputs.dense {
        inputs.dense = Some([k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?]);
    }
    let (b, n_q, d) = (plan.batch, plan.n_q, plan.d);
    let op = ReferenceDecode {
        plan,
        inputs,
        softmax_scale: scale,
    };
    let out = q32.apply_op1_no_bwd(&op)?;
    out.reshape((b, n_q, 1, d))?.to_dtype(q.dtype())
}
