#!/usr/bin/env python3
"""Writes kernels/gemm.ptx.

The PTX is hand-designed; this script only spells out the repetitive parts
(unrolled fragment loads, the 64 FMAs of a micro-tile step, the MMA and wgmma
lists, per-chunk copies) so that every kernel variant (tile size, B layout,
element type) shares one definition. Run from the repository root:

    python3 kernels/gen/gemm.py > kernels/gemm.ptx

(the kernel table goes to stderr). Then check it with ptxas:
    ptxas -arch=sm_90a kernels/gemm.ptx -o /dev/null
"""
import struct
import sys


def f32hex(x):
    return "0f%08X" % struct.unpack(">I", struct.pack(">f", x))[0]


class Ptx:
    def __init__(self):
        self.out = []

    def raw(self, s=""):
        self.out.append(s)

    def c(self, s):
        self.out.append("    // " + s)

    def i(self, s):
        self.out.append("    " + s + ";")

    def l(self, s):
        self.out.append(s + ":")

    def text(self):
        return "\n".join(self.out) + "\n"


HEADER = r"""// gemm kernels; sm_90 module = bytes [@@@@@@@@@@, ##########) of this file.
//
// Hand-written PTX (launchers and CPU references in src/kernels/gemm.rs). The
// unrolled parts (fragment loads, the FMA, MMA and wgmma lists, per-chunk
// copies) are expanded by kernels/gen/gemm.py from one definition per family:
// edit the generator and re-run it (python3 kernels/gen/gemm.py >
// kernels/gemm.ptx) rather than this file. Every kernel is written out in
// full below.
//
// Two modules in one file. The whole file is the sm_90a module (.target
// sm_90a: every kernel, including the wgmma ones, which need the
// architecture-specific target; check it with ptxas -arch=sm_90a). The bytes
// named on the first line are the sm_90 module, which every GPU of compute
// capability 9.0 or later can load: it starts at the second .version below
// (inside a block comment for the sm_90a reading, whose "//*/" line closes
// the comment; a plain line comment for the sm_90 reading) and ends before
// the "sm_90a only" marker, so it holds every kernel but the wgmma ones.
// src/kernels/gemm.rs slices it out at compile time (and fails to compile if
// the first line's offsets are stale).
//
// Every kernel computes, for one batch z = %ctaid.z (strided-batched when the
// grid has several z):
//
//     C[m, n] = act(alpha * sum_k A[m, k] * B'[k, n] + bias[n]) + residual[m, n]
//
// with row-major A[M, K] (leading dimension lda), C and residual [M, N] (both
// leading dimension ldc, residual may be C itself: each element is read and
// then written by the same thread), bias[N] (0 = none), residual (0 = none),
// and B' = B stored [K, N] ("bkn" kernels, GPT-2 Conv1D layout) or
// B' = transpose of B stored [N, K] ("bnk" kernels, nn.Linear layout), leading
// dimension ldb. Batch z reads A + z*sa, B + z*sb and writes C + z*sc
// (strides in elements; residual uses sc too; bias is shared).
// act: 0 none, 1 relu, 2 gelu (erf form), 3 gelu_tanh (GPT-2 "gelu_new").
//
// All kernels take the same parameters (see .entry below); grid =
// (ceil(N / BN), ceil(M / BM), batch), block = the kernel's thread count, and
// dynamic shared memory as listed per kernel (the launcher raises the 48 KiB
// default when needed). Dimensions and leading dimensions are u32, strides
// u64; every global access is bounds-checked against M, N, K.
//
// flags (u32): bit 0: A rows may be read with 16-byte vectors (fp32 kernels:
// A 16-byte aligned and lda % 4 == 0); bit 1: same for B; bit 2: C, residual
// and bias may be accessed with 16-byte vectors (aligned, ldc a multiple of
// 16 bytes). Half kernels need A and B 16-byte aligned with lda, ldb, sa, sb
// multiples of 8 (the launcher checks) and ignore bits 0 and 1.
//
// Kernels (grid = (ceil(N/BN), ceil(M/BM), batch)):
//   gemm_f32_{bkn,bnk}_128x128    256 threads, 67584 B shared (BK 8)
//   gemm_f32_{bkn,bnk}_128x64     256 threads, 69632 B shared (BK 16, 2 K slices)
//   gemm_{f16,bf16}_{bkn,bnk}_128x128  128 threads, 69632 B (BK 32, 2x2 warps)
//   gemm_{f16,bf16}_{bkn,bnk}_64x64    128 threads, 73728 B (BK 64, 4 K groups)
//   gemm_{f16,bf16}_{bkn,bnk}_64x32    128 threads, 49152 B (BK 64, 4 K groups)
//   sm_90a only (wgmma; B stored [N, K]; BK 64, 4 stages):
@@WGTABLE@@
//   gemm_{f16,bf16}_bnk_<tile>_c32: every half-type bnk kernel above (the
//     three mma.sync tiles, and in the sm_90a part the wgmma tiles) again with
//     C, bias and residual in fp32 (A and B in the half type; same threads
//     and shared memory): a half-precision weight times activations rounded
//     to its type, with an fp32 output and residual stream (the Llama
//     prefill's linears). Their epilogue is the fp32 kernels'; their batch
//     stride of C counts fp32 elements.
// The launcher picks the tile from the problem size (choose_tile in
// src/kernels/gemm.rs); on a GPU of compute capability 9.0, half-type bnk
// GEMMs take a wgmma tile instead where its cost model (choose_kernel)
// expects one to be faster. Three families:
//
// 1. gemm_f32_<layout>_<BM>x<BN>: exact fp32 (FFMA, no tensor cores). BM x BN
//    block tile, BK = 8 * KS, KS "K slices" of (BM/8)*(BN/8) threads: slice s
//    multiplies rows 8s..8s+7 of every K tile into its own accumulators, and
//    the epilogue sums the slices' partial tiles. Each thread of a slice owns
//    an 8 x 8 micro-tile made of two 4-row
//    groups (rows ty*4.. and BM/2 + ty*4..) times two 4-column groups (cols
//    tx*4.. and BN/2 + tx*4..), so that a warp's shared-memory reads are
//    16-byte vectors that broadcast or hit distinct banks. Global tiles are
//    read into registers (16-byte vectors when the whole vector is inside the
//    matrix and flags allow it, else guarded scalars with zero fill) while
//    the other shared-memory buffer is being multiplied (double buffering,
//    one barrier per K tile). A is stored transposed in shared memory
//    (As[k][m], rows padded by 4 floats to spread the transposing stores
//    over the banks); B likewise for bnk, and as-is (Bs[k][n]) for bkn.
//
// 2. gemm_<f16|bf16>_<layout>_<BM>x<BN>: tensor cores,
//    mma.sync.aligned.m16n8k16.row.col.f32.<t>.<t>.f32 (fp32 accumulate),
//    a 4-stage cp.async pipeline (16-byte copies; blocks inside M and N copy
//    whole K tiles without checks, edge blocks and the last K tile compute
//    each copy's byte count and let cp.async zero-fill the rest), fragments
//    read with ldmatrix (.trans for bkn). Warps form a WARPS_M x WARPS_N x KS
//    grid; each warp owns a (BM/WARPS_M) x (BN/WARPS_N) sub-tile made of
//    16 x 8 MMA tiles, for its share of the k16 steps of every K tile (KS
//    groups; their partial tiles are summed in the epilogue). Shared-memory
//    rows are XOR-swizzled in 16-byte chunks so that ldmatrix and cp.async
//    hit distinct banks:
//      A (and B for bnk): row r of BK halves; BK = 32: 4 chunks, chunk c
//        stored at c ^ ((r >> 1) & 3); BK = 64: 8 chunks, at c ^ (r & 7);
//      B for bkn: row k of BN halves = BN/8 chunks, chunk c at c ^ (k & 7)
//        (BN = 32: 4 chunks, at c ^ ((k >> 1) & 3)).
//
// 3. gemm_<f16|bf16>_bnk_wg<BM>x<BN> (sm_90a): Hopper warpgroup MMA,
//    wgmma.mma_async.sync.aligned.m64n<BN>k16.f32.<t>.<t> with both operands
//    read from shared memory through matrix descriptors. BM/64 warpgroups of
//    4 warps; warpgroup g owns rows 64g..64g+63 of the block tile and all BN
//    columns (BN/2 fp32 accumulators a thread). K tiles of 64 halves: A and B
//    ([N, K]) tiles are K-major, one 128-byte row per M (N) index, stored
//    with the 128-byte swizzle the descriptors name (16-byte chunk c of row r
//    at chunk c ^ (r & 7); 8-row groups 1024 bytes apart = the stride byte
//    offset; stages 1024-byte aligned), filled by the same cp.async copies as
//    family 2 (all threads; zero fill at the edges). The k16 steps of a K
//    tile advance the descriptors' start address by 32 bytes. Pipeline of 4
//    stages, tiles kt+2 in flight while tile kt is multiplied and tile kt-1's
//    wgmma may still run: per K tile, wait for the own copies of tile kt,
//    fence.proxy.async (cp.async writes are generic-proxy writes, wgmma
//    reads through the async proxy), barrier (after which every warpgroup
//    has also retired the wgmma of tile kt-2), refill tile kt-2's stage with
//    tile kt+2, then wgmma.fence, 4 wgmma, commit, wait_group 1.
//
// All families end the same way: the fp32 accumulators are staged through
// shared memory (rows padded so the staging stores do not conflict), then
// each thread takes whole 16-byte output vectors (4 floats or 8 halves) of a
// row: scale by alpha, add bias, activation, add residual (all in fp32),
// convert and store; vectors that stick out past N, or where flags bit 2 is
// clear, go element by element.
"""


# ---------------------------------------------------------------------------
# Activation function shared by all kernels.
# ---------------------------------------------------------------------------
def gen_act(p):
    inv_sqrt2 = f32hex(-0.7071067811865476)
    erfc_coef = [0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807,
                 -0.18628806, 0.09678418, 0.37409196, 1.00002368, -1.26551223]
    log2e = 1.4426950408889634
    c0 = 0.7978845608028654  # sqrt(2 / pi)
    c1 = c0 * 0.044715
    p.raw("""
// y = act(x); act 0 none, 1 relu, 2 gelu (erf), 3 gelu_tanh.
//
// gelu(x) = 0.5 x (1 + erf(x / sqrt 2)) = 0.5 x erfc(-x / sqrt 2), with erfc
// from Numerical Recipes' Chebyshev fit (erfcc: fractional error < 1.2e-7
// everywhere), so the result keeps its relative accuracy in both tails.
// gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)),
// u = sqrt(2/pi) (x + 0.044715 x^3). exp(v) = ex2.approx(v log2 e).
.func (.reg .f32 %y) gemm_act(.reg .f32 %x, .reg .u32 %act)
{
    .reg .pred %p;
    .reg .f32 %z, %az, %t, %u, %e, %ans, %alt;
""")
    p.i("setp.eq.u32 %p, %act, 1")
    p.i("@%p bra ACT_RELU")
    p.i("setp.eq.u32 %p, %act, 2")
    p.i("@%p bra ACT_GELU")
    p.i("setp.eq.u32 %p, %act, 3")
    p.i("@%p bra ACT_GELU_TANH")
    p.i("mov.f32 %y, %x")
    p.i("ret")
    p.l("ACT_RELU")
    p.i("max.f32 %y, %x, 0f00000000")
    p.i("ret")
    p.l("ACT_GELU")
    p.c("z = -x / sqrt(2); t = 1 / (1 + |z| / 2)")
    p.i("mul.f32 %%z, %%x, %s" % inv_sqrt2)
    p.i("abs.f32 %az, %z")
    p.i("fma.rn.f32 %%t, %%az, %s, %s" % (f32hex(0.5), f32hex(1.0)))
    p.i("rcp.rn.f32 %t, %t")
    p.c("u = -1.26551223 + t*(1.00002368 + t*(0.37409196 + ... + t*0.17087277))")
    p.i("mov.f32 %%u, %s" % f32hex(erfc_coef[0]))
    for cf in erfc_coef[1:]:
        p.i("fma.rn.f32 %%u, %%u, %%t, %s" % f32hex(cf))
    p.c("erfc(|z|) = t * exp(u - z^2)")
    p.i("neg.f32 %e, %az")
    p.i("fma.rn.f32 %e, %e, %az, %u")
    p.i("mul.f32 %%e, %%e, %s" % f32hex(log2e))
    p.i("ex2.approx.ftz.f32 %e, %e")
    p.i("mul.f32 %ans, %t, %e")
    p.c("erfc(z) = z >= 0 ? erfc(|z|) : 2 - erfc(|z|)")
    p.i("sub.f32 %%alt, %s, %%ans" % f32hex(2.0))
    p.i("setp.ge.f32 %p, %z, 0f00000000")
    p.i("selp.f32 %ans, %ans, %alt, %p")
    p.i("mul.f32 %%y, %%x, %s" % f32hex(0.5))
    p.i("mul.f32 %y, %y, %ans")
    p.i("ret")
    p.l("ACT_GELU_TANH")
    p.c("u = x * (c0 + c1 x^2), c0 = sqrt(2/pi), c1 = 0.044715 c0")
    p.i("mul.f32 %t, %x, %x")
    p.i("fma.rn.f32 %%u, %%t, %s, %s" % (f32hex(c1), f32hex(c0)))
    p.i("mul.f32 %u, %u, %x")
    p.c("y = x / (1 + exp(-2u))  (exp overflow gives x / inf = 0)")
    p.i("mul.f32 %%e, %%u, %s" % f32hex(-2.0 * log2e))
    p.i("ex2.approx.ftz.f32 %e, %e")
    p.i("add.f32 %%e, %%e, %s" % f32hex(1.0))
    p.i("div.rn.f32 %y, %x, %e")
    p.i("ret")
    p.raw("}")


PARAMS = """(
    .param .u64 p_a,        // A, row-major [M, K] (per batch)
    .param .u64 p_b,        // B, [K, N] (bkn) or [N, K] (bnk)
    .param .u64 p_c,        // C, [M, N], leading dimension ldc
    .param .u64 p_bias,     // bias [N] or 0
    .param .u64 p_res,      // residual [M, N] (leading dimension ldc) or 0
    .param .u32 p_m,
    .param .u32 p_n,
    .param .u32 p_k,
    .param .u32 p_lda,
    .param .u32 p_ldb,
    .param .u32 p_ldc,
    .param .u64 p_sa,       // batch strides in elements
    .param .u64 p_sb,
    .param .u64 p_sc,
    .param .f32 p_alpha,
    .param .u32 p_act,
    .param .u32 p_flags
)"""


def log2(x):
    r = x.bit_length() - 1
    assert 1 << r == x
    return r


def gen_params(p, esize, csize=None):
    """Loads parameters; applies the batch offset. esize = bytes per element
    of A and B; csize = of C and residual (default esize)."""
    csize = csize or esize
    p.c("parameters; batch z offsets A, B, C and residual")
    p.i("ld.param.u64 %pa, [p_a]")
    p.i("ld.param.u64 %pb, [p_b]")
    p.i("ld.param.u64 %pc, [p_c]")
    p.i("ld.param.u64 %pbias, [p_bias]")
    p.i("ld.param.u64 %pres, [p_res]")
    p.i("ld.param.u32 %M, [p_m]")
    p.i("ld.param.u32 %N, [p_n]")
    p.i("ld.param.u32 %K, [p_k]")
    p.i("ld.param.u32 %lda, [p_lda]")
    p.i("ld.param.u32 %ldb, [p_ldb]")
    p.i("ld.param.u32 %ldc, [p_ldc]")
    p.i("ld.param.f32 %alpha, [p_alpha]")
    p.i("ld.param.u32 %act, [p_act]")
    p.i("ld.param.u32 %flags, [p_flags]")
    p.i("setp.ne.u64 %has_bias, %pbias, 0")
    p.i("setp.ne.u64 %has_res, %pres, 0")
    p.i("cvta.to.global.u64 %pa, %pa")
    p.i("cvta.to.global.u64 %pb, %pb")
    p.i("cvta.to.global.u64 %pc, %pc")
    p.i("cvta.to.global.u64 %pbias, %pbias")
    p.i("cvta.to.global.u64 %pres, %pres")
    p.i("mov.u32 %r0, %ctaid.z")
    p.i("cvt.u64.u32 %rd0, %r0")
    for ptr, par, size in (("%pa", "p_sa", esize), ("%pb", "p_sb", esize), ("%pc", "p_sc", csize), ("%pres", "p_sc", csize)):
        p.i("ld.param.u64 %%rd1, [%s]" % par)
        p.i("mul.lo.u64 %rd1, %rd1, %rd0")
        p.i("shl.b64 %%rd1, %%rd1, %d" % log2(size))
        p.i("add.u64 %s, %s, %%rd1" % (ptr, ptr))
    p.c("block tile origin")
    p.i("mov.u32 %r0, %ctaid.y")
    p.i("mul.lo.u32 %%m0, %%r0, %d" % 0)  # patched by caller (BM)


def common_regs(p):
    p.raw("    .reg .pred %p<16>;")
    p.raw("    .reg .pred %has_bias, %has_res, %vec_a, %vec_b, %vec_c;")
    p.raw("    .reg .b32 %r<48>;")
    p.raw("    .reg .b64 %rd<16>;")
    p.raw("    .reg .f32 %f<8>;")
    p.raw("    .reg .b64 %pa, %pb, %pc, %pbias, %pres;")
    p.raw("    .reg .b32 %M, %N, %K, %lda, %ldb, %ldc, %act, %flags;")
    p.raw("    .reg .f32 %alpha;")
    p.raw("    .reg .b32 %thr, %m0, %n0, %sbase, %kt, %nk;")


def block_origin(p, BM, BN):
    # replace the placeholder emitted by gen_params
    assert p.out[-1].strip() == "mul.lo.u32 %m0, %r0, 0;"
    p.out[-1] = "    mul.lo.u32 %%m0, %%r0, %d;" % BM
    p.i("mov.u32 %r0, %ctaid.x")
    p.i("mul.lo.u32 %%n0, %%r0, %d" % BN)
    p.i("mov.u32 %thr, %tid.x")
    p.i("mov.u32 %sbase, smem")
    p.i("and.b32 %r0, %flags, 1")
    p.i("setp.ne.u32 %vec_a, %r0, 0")
    p.i("and.b32 %r0, %flags, 2")
    p.i("setp.ne.u32 %vec_b, %r0, 0")
    p.i("and.b32 %r0, %flags, 4")
    p.i("setp.ne.u32 %vec_c, %r0, 0")


# ---------------------------------------------------------------------------
# Epilogue shared by both families: accumulators already staged in shared
# memory as fp32 [BM][SE] at %sbase.
# ---------------------------------------------------------------------------
def gen_epilogue(p, tag, BM, BN, NT, SE, half, KS=1, bias_smem=None):
    """half: None (fp32 output) or 'f16' / 'bf16'. KS partial tiles of
    BM*SE floats each, summed. bias_smem: None (each iteration reads bias
    from global memory) or the byte offset from %sbase where the block's
    bias[n0 .. n0+BN) is staged first as fp32 (then the loop's only global
    load is the residual's)."""
    VEC = 8 if half else 4
    ES = 2 if half else 4
    GPR = BN // VEC           # vectors per tile row
    ITERS = BM * BN // VEC // NT
    assert ITERS * NT * VEC == BM * BN
    def load_vec(ptr_reg, dst_prefix, lbl):
        """loads VEC elements at ptr_reg (global) into %<dst_prefix>0.. as f32,
        zero for columns past N."""
        p.i("@!%%p2 bra %s_S" % lbl)
        if half:
            p.i("ld.global.v4.b32 {%w0, %w1, %w2, %w3}, [" + ptr_reg + "]")
            for j in range(4):
                unpack_pair(p, half, "%%w%d" % j, "%%%s%d" % (dst_prefix, 2 * j), "%%%s%d" % (dst_prefix, 2 * j + 1))
        else:
            p.i("ld.global.v4.f32 {%%%s0, %%%s1, %%%s2, %%%s3}, [%s]" % ((dst_prefix,) * 4 + (ptr_reg,)))
        p.i("bra.uni %s_D" % lbl)
        p.l("%s_S" % lbl)
        for j in range(VEC):
            p.i("mov.f32 %%%s%d, 0f00000000" % (dst_prefix, j))
            p.i("setp.gt.u32 %%p3, %%r7, %d" % j)
            if half:
                p.i("@%%p3 ld.global.b16 %%h0, [%s+%d]" % (ptr_reg, j * ES))
                if half == "f16":
                    p.i("@%%p3 cvt.f32.f16 %%%s%d, %%h0" % (dst_prefix, j))
                else:
                    p.i("@%p3 cvt.u32.u16 %r8, %h0")
                    p.i("@%p3 shl.b32 %r8, %r8, 16")
                    p.i("@%%p3 mov.b32 %%%s%d, %%r8" % (dst_prefix, j))
            else:
                p.i("@%%p3 ld.global.f32 %%%s%d, [%s+%d]" % (dst_prefix, j, ptr_reg, j * ES))
        p.l("%s_D" % lbl)

    if bias_smem is not None:
        assert GPR <= NT and bias_smem % 16 == 0
        p.raw("")
        p.c("---- bias[n0 .. n0+%d) as fp32 into shared memory at +%d (0 past N):" % (BN, bias_smem))
        p.c("thread t < %d converts the vector of columns n0 + %d*t .. +%d" % (GPR, VEC, VEC - 1))
        p.i("setp.lt.u32 %%p0, %%thr, %d" % GPR)
        p.i("and.pred %p0, %p0, %has_bias")
        p.i("@!%%p0 bra %s_BS_DONE" % tag)
        p.i("shl.b32 %%r5, %%thr, %d" % log2(VEC))
        p.i("add.u32 %r5, %r5, %n0")
        for j in range(VEC):
            p.i("mov.f32 %%x%d, 0f00000000" % j)
        p.i("setp.ge.u32 %p1, %r5, %N")
        p.i("@%%p1 bra %s_BS_ST" % tag)
        p.i("sub.u32 %r7, %N, %r5")
        p.i("setp.ge.u32 %%p2, %%r7, %d" % VEC)
        p.i("and.pred %p2, %p2, %vec_c")
        p.i("mul.wide.u32 %%rd2, %%r5, %d" % ES)
        p.i("add.u64 %rd2, %rd2, %pbias")
        load_vec("%rd2", "x", tag + "_LBS")
        p.l("%s_BS_ST" % tag)
        p.i("shl.b32 %%r6, %%thr, %d" % log2(VEC * 4))
        p.i("add.u32 %r6, %r6, %sbase")
        for h in range(VEC // 4):
            p.i("st.shared.v4.f32 [%%r6+%d], {%%x%d, %%x%d, %%x%d, %%x%d}" % (
                (bias_smem + 16 * h,) + tuple(4 * h + j for j in range(4))))
        p.l("%s_BS_DONE" % tag)
        p.i("bar.sync 0")
    p.raw("")
    p.c("---- epilogue: %d iterations; iteration i handles vector q = tid + i*%d of the" % (ITERS, NT))
    p.c("tile: row q / %d, columns (q %% %d) * %d .. +%d" % (GPR, GPR, VEC, VEC - 1))
    p.i("mov.u32 %kt, 0")
    p.l("%s_EPI" % tag)
    p.i("mad.lo.u32 %%r1, %%kt, %d, %%thr" % NT)
    if GPR & (GPR - 1) == 0:
        p.i("shr.u32 %%r2, %%r1, %d" % log2(GPR))        # tile row
        p.i("and.b32 %%r3, %%r1, %d" % (GPR - 1))         # vector in row
    else:
        p.i("div.u32 %%r2, %%r1, %d" % GPR)
        p.i("rem.u32 %%r3, %%r1, %d" % GPR)
    p.i("add.u32 %r4, %m0, %r2")                          # global row m
    p.i("shl.b32 %%r5, %%r3, %d" % log2(VEC))
    p.i("add.u32 %r5, %n0, %r5")                          # global col n
    p.i("setp.ge.u32 %p0, %r4, %M")
    p.i("setp.ge.u32 %p1, %r5, %N")
    p.i("or.pred %p0, %p0, %p1")
    p.i("@%%p0 bra %s_EPI_NEXT" % tag)
    p.c("v = alpha * staged accumulators")
    p.i("mad.lo.u32 %%r6, %%r2, %d, %%r3" % (SE // VEC))  # (row*SE + vec*VEC)/VEC
    p.i("shl.b32 %%r6, %%r6, %d" % log2(VEC * 4))
    p.i("add.u32 %r6, %r6, %sbase")
    p.i("ld.shared.v4.f32 {%v0, %v1, %v2, %v3}, [%r6]")
    if VEC == 8:
        p.i("ld.shared.v4.f32 {%v4, %v5, %v6, %v7}, [%r6+16]")
    for sidx in range(1, KS):
        p.c("+ partial sum of K slice %d" % sidx)
        for h in range(VEC // 4):
            off = sidx * BM * SE * 4 + 16 * h
            p.i("ld.shared.v4.f32 {%%x0, %%x1, %%x2, %%x3}, [%%r6+%d]" % off)
            for j in range(4):
                p.i("add.f32 %%v%d, %%v%d, %%x%d" % (4 * h + j, 4 * h + j, j))
    for j in range(VEC):
        p.i("mul.f32 %%v%d, %%v%d, %%alpha" % (j, j))
    p.c("r7 = valid columns in this vector; p2 = whole vector, 16-byte path")
    p.i("sub.u32 %r7, %N, %r5")
    p.i("setp.ge.u32 %%p2, %%r7, %d" % VEC)
    p.i("and.pred %p2, %p2, %vec_c")

    p.c("+ bias[n..]")
    p.i("@!%%has_bias bra %s_NOBIAS" % tag)
    if bias_smem is None:
        p.i("mul.wide.u32 %%rd2, %%r5, %d" % ES)
        p.i("add.u64 %rd2, %rd2, %pbias")
        load_vec("%rd2", "x", tag + "_LB")
    else:
        p.i("shl.b32 %%r8, %%r3, %d" % log2(VEC * 4))
        p.i("add.u32 %r8, %r8, %sbase")
        for h in range(VEC // 4):
            p.i("ld.shared.v4.f32 {%%x%d, %%x%d, %%x%d, %%x%d}, [%%r8+%d]" % (
                tuple(4 * h + j for j in range(4)) + (bias_smem + 16 * h,)))
    for j in range(VEC):
        p.i("add.f32 %%v%d, %%v%d, %%x%d" % (j, j, j))
    p.l("%s_NOBIAS" % tag)
    p.c("activation (uniform branch)")
    p.i("setp.eq.u32 %p3, %act, 0")
    p.i("@%%p3 bra %s_NOACT" % tag)
    for j in range(VEC):
        p.i("call (%%v%d), gemm_act, (%%v%d, %%act)" % (j, j))
    p.l("%s_NOACT" % tag)
    p.c("rd3 = element offset of (m, n) in C and residual")
    p.i("mul.wide.u32 %rd3, %r4, %ldc")
    p.i("cvt.u64.u32 %rd4, %r5")
    p.i("add.u64 %rd3, %rd3, %rd4")
    p.i("shl.b64 %%rd3, %%rd3, %d" % log2(ES))
    p.c("+ residual[m, n..]")
    p.i("@!%%has_res bra %s_NORES" % tag)
    p.i("add.u64 %rd2, %rd3, %pres")
    load_vec("%rd2", "x", tag + "_LR")
    for j in range(VEC):
        p.i("add.f32 %%v%d, %%v%d, %%x%d" % (j, j, j))
    p.l("%s_NORES" % tag)
    p.c("store")
    p.i("add.u64 %rd2, %rd3, %pc")
    p.i("@!%%p2 bra %s_SS" % tag)
    if half:
        cvt = "cvt.rn.f16x2.f32" if half == "f16" else "cvt.rn.bf16x2.f32"
        for j in range(4):
            # upper half = first source operand = the higher column
            p.i("%s %%w%d, %%v%d, %%v%d" % (cvt, j, 2 * j + 1, 2 * j))
        p.i("st.global.v4.b32 [%rd2], {%w0, %w1, %w2, %w3}")
    else:
        p.i("st.global.v4.f32 [%rd2], {%v0, %v1, %v2, %v3}")
    p.i("bra.uni %s_EPI_NEXT" % tag)
    p.l("%s_SS" % tag)
    for j in range(VEC):
        p.i("setp.gt.u32 %%p3, %%r7, %d" % j)
        if half:
            cvt1 = "cvt.rn.f16.f32" if half == "f16" else "cvt.rn.bf16.f32"
            p.i("%s %%h0, %%v%d" % (cvt1, j))
            p.i("@%%p3 st.global.b16 [%%rd2+%d], %%h0" % (j * ES))
        else:
            p.i("@%%p3 st.global.f32 [%%rd2+%d], %%v%d" % (j * ES, j))
    p.l("%s_EPI_NEXT" % tag)
    p.i("add.u32 %kt, %kt, 1")
    p.i("setp.lt.u32 %%p0, %%kt, %d" % ITERS)
    p.i("@%%p0 bra %s_EPI" % tag)
    p.i("ret")


def unpack_pair(p, half, w, lo, hi):
    if half == "f16":
        p.i("mov.b32 {%%h0, %%h1}, %s" % w)
        p.i("cvt.f32.f16 %s, %%h0" % lo)
        p.i("cvt.f32.f16 %s, %%h1" % hi)
    else:
        p.i("shl.b32 %%r8, %s, 16" % w)
        p.i("mov.b32 %s, %%r8" % lo)
        p.i("and.b32 %%r8, %s, -65536" % w)
        p.i("mov.b32 %s, %%r8" % hi)


def epi_regs(p, half):
    VEC = 8 if half else 4
    p.raw("    .reg .f32 %%v<%d>, %%x<%d>;" % (VEC, VEC))
    if half:
        p.raw("    .reg .b32 %w<4>;")
        p.raw("    .reg .b16 %h<2>;")


# ---------------------------------------------------------------------------
# fp32 SIMT kernel
# ---------------------------------------------------------------------------
def gen_f32(p, layout, BM, BN, KS=1, minblocks=0, name=None):
    """fp32 SIMT kernel. KS K-slices: KS groups of (BM/8)*(BN/8) threads each
    multiply their own 8-row slice of every BK = 8*KS tile; their partial
    tiles are summed in the epilogue."""
    BK = 8 * KS
    TX, TY = BN // 8, BM // 8
    NTS = TX * TY              # threads per K slice
    NT = NTS * KS
    SA = BM + 4                # As row stride (floats)
    SB = BN + 4                # Bs row stride
    ASZ = BK * SA * 4          # bytes of one A buffer
    BSZ = BK * SB * 4
    SE = BN + 4                # staging row stride
    MAIN = 2 * ASZ + 2 * BSZ
    EPI = KS * BM * SE * 4
    SMEM = max(MAIN, EPI)
    VPR = BK // 4              # 4-float vectors per A row (and per bnk B row)
    name = name or "gemm_f32_%s_%dx%d" % (layout, BM, BN)
    tag = "F" + name.upper().replace("GEMM_F32_", "").replace("_", "")
    LA = BM * BK // 4 // NT      # A vectors per thread
    LB = BN * BK // 4 // NT      # B vectors per thread
    assert LA >= 1 and LB >= 1 and LA * NT * 4 == BM * BK and LB * NT * 4 == BN * BK
    p.raw("")
    p.raw("// " + "-" * 76)
    p.raw("// %s: fp32, B stored %s. Block tile %dx%d, BK = %d, %d threads:" % (
        name, "[K, N]" if layout == "bkn" else "[N, K]", BM, BN, BK, NT))
    if KS > 1:
        p.raw("// %d K slices of %d threads; slice s multiplies rows 8s..8s+7 of each" % (KS, NTS))
        p.raw("// K tile, its partial tile is staged separately and the epilogue sums them.")
    p.raw("// Within a slice, threads form %d (tx) x %d (ty), 8x8 accumulators each." % (TX, TY))
    p.raw("// Dynamic shared memory %d bytes: As[2][%d][%d] and Bs[2][%d][%d] floats in" % (SMEM, BK, SA, BK, SB))
    p.raw("// the main loop, %d staged [%d][%d] float tile(s) in the epilogue." % (KS, BM, SE))
    p.raw("// " + "-" * 76)
    p.raw(".visible .entry " + name + PARAMS)
    p.raw(".maxntid %d, 1, 1" % NT)
    if minblocks:
        p.raw(".minnctapersm %d" % minblocks)
    p.raw("{")
    common_regs(p)
    epi_regs(p, None)
    p.raw("    .reg .f32 %%acc<64>, %%fa<16>, %%fb<16>, %%ga<%d>, %%gb<%d>;" % (4 * LA, 4 * LB))
    p.raw("    .reg .b32 %tx, %ty, %ks, %k0, %bufa, %bufb;")
    p.raw("    .reg .b32 %%arow<%d>, %%akq<%d>, %%asts<%d>;" % (LA, LA, LA))
    p.raw("    .reg .b32 %%brow<%d>, %%bcol<%d>, %%bsts<%d>;" % (LB, LB, LB))
    p.raw("    .reg .b32 %rda, %rdb;")
    p.raw("")
    gen_params(p, 4)
    block_origin(p, BM, BN)
    p.c("slice ks = tid / %d; inside it tx = t %% %d, ty = t / %d" % (NTS, TX, TX))
    p.i("div.u32 %%ks, %%thr, %d" % NTS)
    p.i("rem.u32 %%r0, %%thr, %d" % NTS)
    p.i("rem.u32 %%tx, %%r0, %d" % TX)
    p.i("div.u32 %%ty, %%r0, %d" % TX)
    p.c("nk = number of K tiles")
    p.i("add.u32 %%nk, %%K, %d" % (BK - 1))
    p.i("shr.u32 %%nk, %%nk, %d" % log2(BK))

    p.c("A tile (BM x %d) as 4-float vectors: vector q = tid + i*%d -> row q/%d, k (q%%%d)*4;" % (BK, NT, VPR, VPR))
    p.c("stored transposed at As[k][row] (asts = byte offset of As[k][row])")
    for i in range(LA):
        p.i("add.u32 %%r0, %%thr, %d" % (i * NT))
        p.i("shr.u32 %%arow%d, %%r0, %d" % (i, log2(VPR)))
        p.i("and.b32 %%akq%d, %%r0, %d" % (i, VPR - 1))
        p.i("shl.b32 %%akq%d, %%akq%d, 2" % (i, i))
        p.i("mad.lo.u32 %%asts%d, %%akq%d, %d, %%arow%d" % (i, i, SA, i))
        p.i("shl.b32 %%asts%d, %%asts%d, 2" % (i, i))
        p.i("add.u32 %%arow%d, %%arow%d, %%m0" % (i, i))
    if layout == "bnk":
        p.c("B tile (BN x %d of [N, K]) likewise: row n = q/%d, k (q%%%d)*4, stored at Bs[k][n]" % (BK, VPR, VPR))
        for i in range(LB):
            p.i("add.u32 %%r0, %%thr, %d" % (i * NT))
            p.i("shr.u32 %%brow%d, %%r0, %d" % (i, log2(VPR)))
            p.i("and.b32 %%bcol%d, %%r0, %d" % (i, VPR - 1))
            p.i("shl.b32 %%bcol%d, %%bcol%d, 2" % (i, i))
            p.i("mad.lo.u32 %%bsts%d, %%bcol%d, %d, %%brow%d" % (i, i, SB, i))
            p.i("shl.b32 %%bsts%d, %%bsts%d, 2" % (i, i))
            p.i("add.u32 %%brow%d, %%brow%d, %%n0" % (i, i))
    else:
        p.c("B tile (%d x BN of [K, N]): vector q -> k = q/%d, n = (q%%%d)*4, stored at Bs[k][n]" % (BK, BN // 4, BN // 4))
        for i in range(LB):
            p.i("add.u32 %%r0, %%thr, %d" % (i * NT))
            p.i("shr.u32 %%brow%d, %%r0, %d" % (i, log2(BN // 4)))
            p.i("and.b32 %%bcol%d, %%r0, %d" % (i, BN // 4 - 1))
            p.i("shl.b32 %%bcol%d, %%bcol%d, 2" % (i, i))
            p.i("mad.lo.u32 %%bsts%d, %%brow%d, %d, %%bcol%d" % (i, i, SB, i))
            p.i("shl.b32 %%bsts%d, %%bsts%d, 2" % (i, i))
            p.i("add.u32 %%bcol%d, %%bcol%d, %%n0" % (i, i))
    p.c("compute reads: As[8ks+kk][ty*4..], As[..][BM/2 + ty*4..], Bs[8ks+kk][tx*4..], Bs[..][BN/2 + tx*4..]")
    p.i("mul.lo.u32 %%r0, %%ks, %d" % (8 * SA * 4))
    p.i("shl.b32 %rda, %ty, 4")
    p.i("add.u32 %rda, %rda, %r0")
    p.i("add.u32 %rda, %rda, %sbase")
    p.i("mul.lo.u32 %%r0, %%ks, %d" % (8 * SB * 4))
    p.i("shl.b32 %rdb, %tx, 4")
    p.i("add.u32 %rdb, %rdb, %r0")
    p.i("add.u32 %rdb, %rdb, %sbase")
    p.i("add.u32 %%rdb, %%rdb, %d" % (2 * ASZ))
    p.c("zero accumulators")
    for j in range(64):
        p.i("mov.f32 %%acc%d, 0f00000000" % j)

    lblc = [0]

    def load4(dst, base, row, R, col, C, ld, vec, what):
        """dst[0..3] = X[row][col..col+3] of row-major X (R rows, C cols, leading
        dim ld), zero outside; 16-byte vector when vec and fully inside."""
        lblc[0] += 1
        L = "%s_L%d" % (tag, lblc[0])
        p.c("%s: 4 floats at [%s][%s..+3]" % (what, row, col))
        p.i("setp.lt.u32 %%p1, %s, %s" % (row, R))
        p.i("add.u32 %%r1, %s, 4" % col)
        p.i("setp.le.u32 %%p2, %%r1, %s" % C)
        p.i("and.pred %p2, %p2, %p1")
        p.i("and.pred %%p2, %%p2, %s" % vec)
        p.i("mul.wide.u32 %%rd2, %s, %s" % (row, ld))
        p.i("cvt.u64.u32 %%rd3, %s" % col)
        p.i("add.u64 %rd2, %rd2, %rd3")
        p.i("shl.b64 %rd2, %rd2, 2")
        p.i("add.u64 %%rd2, %%rd2, %s" % base)
        p.i("@!%%p2 bra %s_S" % L)
        p.i("ld.global.nc.v4.f32 {%s, %s, %s, %s}, [%%rd2]" % tuple(dst))
        p.i("bra.uni %s_D" % L)
        p.l("%s_S" % L)
        for j in range(4):
            p.i("mov.f32 %s, 0f00000000" % dst[j])
            if j:
                p.i("add.u32 %%r1, %s, %d" % (col, j))
                p.i("setp.lt.u32 %p3, %r1, " + C)
            else:
                p.i("setp.lt.u32 %%p3, %s, %s" % (col, C))
            p.i("and.pred %p3, %p3, %p1")
            p.i("@%%p3 ld.global.nc.f32 %s, [%%rd2+%d]" % (dst[j], 4 * j))
        p.l("%s_D" % L)

    def load_tile():
        """global tile at k0 -> %ga, %gb"""
        for i in range(LA):
            p.i("add.u32 %%r0, %%k0, %%akq%d" % i)
            load4(["%%ga%d" % (4 * i + j) for j in range(4)], "%pa", "%%arow%d" % i, "%M",
                  "%r0", "%K", "%lda", "%vec_a", "A")
        for i in range(LB):
            if layout == "bnk":
                p.i("add.u32 %%r0, %%k0, %%bcol%d" % i)
                load4(["%%gb%d" % (4 * i + j) for j in range(4)], "%pb", "%%brow%d" % i, "%N",
                      "%r0", "%K", "%ldb", "%vec_b", "B")
            else:
                p.i("add.u32 %%r0, %%k0, %%brow%d" % i)
                load4(["%%gb%d" % (4 * i + j) for j in range(4)], "%pb", "%r0", "%K",
                      "%%bcol%d" % i, "%N", "%ldb", "%vec_b", "B")

    def store_tile(bufa, bufb):
        """%ga, %gb -> shared buffers at byte offsets bufa / bufb (registers)"""
        p.i("add.u32 %%r9, %%sbase, %s" % bufa)
        for i in range(LA):
            p.i("add.u32 %%r10, %%r9, %%asts%d" % i)
            for j in range(4):
                p.i("st.shared.f32 [%%r10+%d], %%ga%d" % (j * SA * 4, 4 * i + j))
        p.i("add.u32 %%r9, %%sbase, %s" % bufb)
        for i in range(LB):
            p.i("add.u32 %%r10, %%r9, %%bsts%d" % i)
            if layout == "bnk":
                for j in range(4):
                    p.i("st.shared.f32 [%%r10+%d], %%gb%d" % (j * SB * 4, 4 * i + j))
            else:
                p.i("st.shared.v4.f32 [%%r10], {%%gb%d, %%gb%d, %%gb%d, %%gb%d}" % tuple(4 * i + j for j in range(4)))

    p.c("---- prologue: K tile 0 into buffer 0")
    p.i("mov.u32 %k0, 0")
    load_tile()
    p.i("mov.u32 %bufa, 0")
    p.i("mov.u32 %%bufb, %d" % (2 * ASZ))
    store_tile("%bufa", "%bufb")
    p.i("bar.sync 0")
    p.i("mov.u32 %kt, 0")
    p.c("---- main loop over K tiles: load tile kt+1 into registers, multiply")
    p.c("buffer kt%2, store the registers into the other buffer, barrier")
    p.l("%s_LOOP" % tag)
    p.i("add.u32 %r11, %kt, 1")
    p.i("setp.lt.u32 %p5, %r11, %nk")
    p.i("@!%%p5 bra %s_NOLOAD" % tag)
    p.i("shl.b32 %%k0, %%r11, %d" % log2(BK))
    load_tile()
    p.l("%s_NOLOAD" % tag)
    p.c("buffer offsets of tile kt (bufa / bufb) and kt+1 (r12 / r13)")
    p.i("and.b32 %r0, %kt, 1")
    p.i("setp.ne.u32 %p6, %r0, 0")
    p.i("selp.b32 %%bufa, %d, 0, %%p6" % ASZ)
    p.i("selp.b32 %%bufb, %d, %d, %%p6" % (2 * ASZ + BSZ, 2 * ASZ))
    p.i("selp.b32 %%r12, 0, %d, %%p6" % ASZ)
    p.i("selp.b32 %%r13, %d, %d, %%p6" % (2 * ASZ, 2 * ASZ + BSZ))
    p.i("add.u32 %r14, %rda, %bufa")
    p.i("add.u32 %r15, %rdb, %bufb")
    p.i("sub.u32 %%r15, %%r15, %d" % (2 * ASZ))
    for kk in range(8):
        s = (kk & 1) * 8
        fa = ["%%fa%d" % (s + j) for j in range(8)]
        fb = ["%%fb%d" % (s + j) for j in range(8)]
        p.c("k step %d of this slice: a = As[8ks+%d][ty*4..+3, BM/2+ty*4..+3], b = Bs[8ks+%d][tx*4.., BN/2+tx*4..]" % (kk, kk, kk))
        p.i("ld.shared.v4.f32 {%s, %s, %s, %s}, [%%r14+%d]" % (tuple(fa[0:4]) + (kk * SA * 4,)))
        p.i("ld.shared.v4.f32 {%s, %s, %s, %s}, [%%r14+%d]" % (tuple(fa[4:8]) + (kk * SA * 4 + BM // 2 * 4,)))
        p.i("ld.shared.v4.f32 {%s, %s, %s, %s}, [%%r15+%d]" % (tuple(fb[0:4]) + (kk * SB * 4,)))
        p.i("ld.shared.v4.f32 {%s, %s, %s, %s}, [%%r15+%d]" % (tuple(fb[4:8]) + (kk * SB * 4 + BN // 2 * 4,)))
        for i in range(8):
            for j in range(8):
                p.i("fma.rn.f32 %%acc%d, %s, %s, %%acc%d" % (i * 8 + j, fa[i], fb[j], i * 8 + j))
    p.i("@!%%p5 bra %s_NOSTORE" % tag)
    store_tile("%r12", "%r13")
    p.l("%s_NOSTORE" % tag)
    p.i("bar.sync 0")
    p.i("add.u32 %kt, %kt, 1")
    p.i("setp.lt.u32 %p0, %kt, %nk")
    p.i("@%%p0 bra %s_LOOP" % tag)

    p.c("---- stage the 8x8 accumulators into partial tile ks: row (i<4 ? ty*4+i :")
    p.c("BM/2+ty*4+i-4), columns tx*4.. and BN/2+tx*4.. of a [BM][%d] float tile (the" % SE)
    p.c("last barrier of the loop ended all reads of the main-loop buffers)")
    p.i("shl.b32 %r0, %ty, 2")
    p.i("mul.lo.u32 %%r0, %%r0, %d" % (SE * 4))
    p.i("shl.b32 %r1, %tx, 4")
    p.i("add.u32 %r0, %r0, %r1")
    p.i("mad.lo.u32 %%r0, %%ks, %d, %%r0" % (BM * SE * 4))
    p.i("add.u32 %r0, %r0, %sbase")
    for i in range(8):
        row = (i if i < 4 else BM // 2 + i - 4)
        for g in range(2):
            off = (row * SE + g * BN // 2) * 4
            a = i * 8 + g * 4
            p.i("st.shared.v4.f32 [%%r0+%d], {%%acc%d, %%acc%d, %%acc%d, %%acc%d}" % (off, a, a + 1, a + 2, a + 3))
    p.i("bar.sync 0")
    gen_epilogue(p, tag, BM, BN, NT, SE, None, KS)
    p.raw("}")
    return name, NT, SMEM


# ---------------------------------------------------------------------------
# fp16 / bf16 tensor-core kernel
# ---------------------------------------------------------------------------
def gen_half(p, dt, layout, BM, BN, BK, WARPS_M, WARPS_N, STAGES, KS=1, name=None, c32=False):
    """c32: C, bias and residual in fp32 (the "_c32" kernels), not in dt."""
    NW = WARPS_M * WARPS_N * KS
    NT = NW * 32
    J = BK // 16 // KS                  # k16 steps per warp per K tile
    assert J >= 1 and J * KS * 16 == BK
    WTM, WTN = BM // WARPS_M, BN // WARPS_N
    MT, NT8 = WTM // 16, WTN // 8
    NP = NT8 // 2                       # ldmatrix.x4 per B k16 step
    KSTEPS = BK // 16
    assert NT8 % 2 == 0 and STAGES & (STAGES - 1) == 0 or True
    A_BYTES = BM * BK * 2
    B_BYTES = BN * BK * 2
    STAGE = A_BYTES + B_BYTES
    SE = BN + 8
    SMEM = max(STAGES * STAGE, KS * BM * SE * 4)
    ROWK = BK * 2                       # bytes of an A (or bnk B) shared row
    CPRK = BK // 8                      # 16-byte chunks per such row
    RA = NT // CPRK                     # rows between a thread's A chunks
    LA = BM // RA
    if layout == "bnk":
        RB = NT // CPRK
        LB = BN // RB
    else:
        CPRN = BN // 8                  # chunks per bkn B row
        BROW = BN * 2
        RB = NT // CPRN                 # k rows between a thread's B chunks
        LB = BK // RB
    assert LA >= 1 and LB >= 1 and RA % 8 == 0 and RB % 8 == 0
    assert layout == "bnk" or CPRN in (4, 8, 16)
    name = name or "gemm_%s_%s_%dx%d%s" % (dt, layout, BM, BN, "_c32" if c32 else "")
    tag = "H" + name.upper().replace("GEMM_", "").replace("_", "")
    mma = "mma.sync.aligned.m16n8k16.row.col.f32.%s.%s.f32" % (dt, dt)

    def keyk(dst, row):
        """swizzle key of a K-major row (A, bnk B): 4 chunks: (row>>1)&3; 8: row&7"""
        if CPRK == 4:
            p.i("shr.u32 %s, %s, 1" % (dst, row))
            p.i("and.b32 %s, %s, 3" % (dst, dst))
        else:
            p.i("and.b32 %s, %s, 7" % (dst, row))

    p.raw("")
    p.raw("// " + "-" * 76)
    p.raw("// %s: %s tensor cores, B stored %s%s. Block tile %dx%dx%d, %d warps" % (
        name, dt, "[K, N]" if layout == "bkn" else "[N, K]", "; C, bias, residual fp32" if c32 else "", BM, BN, BK, NW))
    p.raw("// (%d along M x %d along N x %d along K), warp tile %dx%d = %dx%d MMA tiles of" % (
        WARPS_M, WARPS_N, KS, WTM, WTN, MT, NT8))
    if KS > 1:
        steps = "k16 step g" if J == 1 else "k16 steps %d*g .. %d*g+%d" % (J, J, J - 1)
        p.raw("// 16x8; K group g (warps %d*g .. %d*g+%d) multiplies %s of every" % (
            WARPS_M * WARPS_N, WARPS_M * WARPS_N, WARPS_M * WARPS_N - 1, steps))
        p.raw("// K tile, and the epilogue sums the %d groups' staged partial tiles." % KS)
    else:
        p.raw("// 16x8.")
    p.raw("// %d-stage cp.async pipeline, stage = A %d B + B %d B; dynamic shared" % (STAGES, A_BYTES, B_BYTES))
    p.raw("// memory %d bytes (the epilogue's [%d][%d] float tile reuses it)." % (SMEM, BM, SE))
    p.raw("// " + "-" * 76)
    p.raw(".visible .entry " + name + PARAMS)
    p.raw(".maxntid %d, 1, 1" % NT)
    p.raw("{")
    common_regs(p)
    epi_regs(p, dt)
    p.raw("    .reg .f32 %%acc<%d>;" % (MT * NT8 * 4))
    p.raw("    .reg .b32 %%fa<%d>, %%fb<%d>;" % (2 * MT * 4, 2 * NP * 4))
    p.raw("    .reg .b32 %lane, %warp, %wm, %wn, %kg, %rs, %ws, %k0;")
    p.raw("    .reg .b32 %%offa<%d>, %%offb<%d>;" % (J, max(J, NP)))
    p.raw("    .reg .b32 %adst, %bdst, %arow, %akc, %brow, %bkc;")
    p.raw("    .reg .b64 %asrc, %bsrc, %astep, %bstep, %btile;")
    p.raw("    .reg .pred %interior;")
    p.raw("")
    gen_params(p, 2, 4 if c32 else 2)
    block_origin(p, BM, BN)
    p.i("and.b32 %lane, %thr, 31")
    p.i("shr.u32 %warp, %thr, 5")
    p.c("warp = (kg * %d + wm) * %d + wn: K group kg, position (wm, wn)" % (WARPS_M, WARPS_N))
    p.i("div.u32 %%kg, %%warp, %d" % (WARPS_M * WARPS_N))
    p.i("rem.u32 %%r0, %%warp, %d" % (WARPS_M * WARPS_N))
    p.i("rem.u32 %%wn, %%r0, %d" % WARPS_N)
    p.i("div.u32 %%wm, %%r0, %d" % WARPS_N)
    p.i("add.u32 %%nk, %%K, %d" % (BK - 1))
    p.i("shr.u32 %%nk, %%nk, %d" % log2(BK))
    p.c("interior = the block tile lies inside M and N (then only K needs checks)")
    p.i("add.u32 %%r0, %%m0, %d" % BM)
    p.i("setp.le.u32 %interior, %r0, %M")
    p.i("add.u32 %%r0, %%n0, %d" % BN)
    p.i("setp.le.u32 %p0, %r0, %N")
    p.i("and.pred %interior, %interior, %p0")

    # ---- cp.async mapping
    p.c("A tile (%d rows x %d halves = %d 16-byte chunks a row): thread t copies chunk" % (BM, BK, CPRK))
    p.c("c = t%%%d of rows t/%d + i*%d (i < %d), stored at row*%d + ((c ^ key(row))*16)," % (CPRK, CPRK, RA, LA, ROWK))
    p.c("key = %s (the same for all i). asrc = &A[m0 + t/%d][c*8] of the next K tile" % (
        "(row>>1)&3" if CPRK == 4 else "row&7", CPRK))
    p.i("shr.u32 %%r1, %%thr, %d" % log2(CPRK))
    p.i("and.b32 %%r2, %%thr, %d" % (CPRK - 1))
    keyk("%r3", "%r1")
    p.i("xor.b32 %r3, %r3, %r2")
    p.i("shl.b32 %r3, %r3, 4")
    p.i("mad.lo.u32 %%adst, %%r1, %d, %%r3" % ROWK)
    p.i("shl.b32 %akc, %r2, 3")
    p.i("add.u32 %arow, %r1, %m0")
    p.i("mul.wide.u32 %rd2, %arow, %lda")
    p.i("cvt.u64.u32 %rd3, %akc")
    p.i("add.u64 %rd2, %rd2, %rd3")
    p.i("shl.b64 %rd2, %rd2, 1")
    p.i("add.u64 %asrc, %pa, %rd2")
    p.i("mul.wide.u32 %%astep, %%lda, %d" % (RA * 2))
    if layout == "bnk":
        p.c("B tile ([N, K] rows n): same mapping as A")
        p.i("shr.u32 %%r1, %%thr, %d" % log2(CPRK))
        p.i("and.b32 %%r2, %%thr, %d" % (CPRK - 1))
        keyk("%r3", "%r1")
        p.i("xor.b32 %r3, %r3, %r2")
        p.i("shl.b32 %r3, %r3, 4")
        p.i("mad.lo.u32 %%bdst, %%r1, %d, %%r3" % ROWK)
        p.i("add.u32 %%bdst, %%bdst, %d" % A_BYTES)
        p.i("shl.b32 %bkc, %r2, 3")
        p.i("add.u32 %brow, %r1, %n0")
        p.i("mul.wide.u32 %rd2, %brow, %ldb")
        p.i("cvt.u64.u32 %rd3, %bkc")
        p.i("add.u64 %rd2, %rd2, %rd3")
        p.i("shl.b64 %rd2, %rd2, 1")
        p.i("add.u64 %bsrc, %pb, %rd2")
        p.i("mul.wide.u32 %%bstep, %%ldb, %d" % (RB * 2))
        p.i("mov.u64 %%btile, %d" % (BK * 2))
    else:
        p.c("B tile (%d k rows x %d halves = %d chunks a row): thread t copies chunk" % (BK, BN, CPRN))
        p.c("c = t%%%d of k rows t/%d + i*%d (i < %d), stored at k*%d + ((c ^ %s)*16)." % (
            CPRN, CPRN, RB, LB, BROW, "(k&7)" if CPRN >= 8 else "((k>>1)&3)"))
        p.c("bsrc = &B[k0 + t/%d][n0 + c*8] of the next K tile; bkc = n0 + c*8" % CPRN)
        p.i("shr.u32 %%brow, %%thr, %d" % log2(CPRN))
        p.i("and.b32 %%r2, %%thr, %d" % (CPRN - 1))
        if CPRN >= 8:
            p.i("and.b32 %r3, %brow, 7")
        else:
            p.i("shr.u32 %r3, %brow, 1")
            p.i("and.b32 %r3, %r3, 3")
        p.i("xor.b32 %r3, %r3, %r2")
        p.i("shl.b32 %r3, %r3, 4")
        p.i("mad.lo.u32 %%bdst, %%brow, %d, %%r3" % BROW)
        p.i("add.u32 %%bdst, %%bdst, %d" % A_BYTES)
        p.i("shl.b32 %bkc, %r2, 3")
        p.i("add.u32 %bkc, %bkc, %n0")
        p.i("mul.wide.u32 %rd2, %brow, %ldb")
        p.i("cvt.u64.u32 %rd3, %bkc")
        p.i("add.u64 %rd2, %rd2, %rd3")
        p.i("shl.b64 %rd2, %rd2, 1")
        p.i("add.u64 %bsrc, %pb, %rd2")
        p.i("mul.wide.u32 %%bstep, %%ldb, %d" % (RB * 2))
        p.i("mul.wide.u32 %%btile, %%ldb, %d" % (BK * 2))

    lblc = [0]

    def issue_tile():
        """cp.async of the K tile at %k0 into stage %ws; advances asrc/bsrc."""
        lblc[0] += 1
        L = "%s_I%d" % (tag, lblc[0])
        p.i("mul.lo.u32 %%r20, %%ws, %d" % STAGE)
        p.i("add.u32 %r20, %r20, %sbase")
        p.i("add.u32 %r26, %r20, %adst")
        p.i("add.u32 %r27, %r20, %bdst")
        p.c("fast path: interior block and the whole K tile inside K")
        p.i("add.u32 %%r21, %%k0, %d" % BK)
        p.i("setp.le.u32 %p8, %r21, %K")
        p.i("and.pred %p8, %p8, %interior")
        p.i("@!%%p8 bra %s_SLOW" % L)
        p.i("mov.u64 %rd4, %asrc")
        for i in range(LA):
            p.i("cp.async.cg.shared.global [%%r26+%d], [%%rd4], 16" % (i * RA * ROWK))
            if i + 1 < LA:
                p.i("add.u64 %rd4, %rd4, %astep")
        p.i("mov.u64 %rd4, %bsrc")
        for i in range(LB):
            off = i * RB * (ROWK if layout == "bnk" else BROW)
            p.i("cp.async.cg.shared.global [%%r27+%d], [%%rd4], 16" % off)
            if i + 1 < LB:
                p.i("add.u64 %rd4, %rd4, %bstep")
        p.i("bra.uni %s_DONE" % L)
        p.l("%s_SLOW" % L)
        p.c("slow path: per chunk, bytes = 16 inside, 0..14 on the K (or N) edge, 0 outside")
        p.c("(zero fill); a chunk with 0 bytes reads nothing and gets the matrix base address")
        for i in range(LA):
            p.i("add.u32 %%r21, %%arow, %d" % (i * RA))
            p.i("add.u32 %r22, %k0, %akc")
            p.i("sub.s32 %r23, %K, %r22")
            p.i("shl.b32 %r23, %r23, 1")
            p.i("min.s32 %r23, %r23, 16")
            p.i("max.s32 %r23, %r23, 0")
            p.i("setp.lt.u32 %p7, %r21, %M")
            p.i("selp.b32 %r23, %r23, 0, %p7")
            p.i("mul.wide.u32 %rd4, %r21, %lda")
            p.i("cvt.u64.u32 %rd5, %r22")
            p.i("add.u64 %rd4, %rd4, %rd5")
            p.i("shl.b64 %rd4, %rd4, 1")
            p.i("add.u64 %rd4, %rd4, %pa")
            p.i("setp.eq.u32 %p7, %r23, 0")
            p.i("selp.b64 %rd4, %pa, %rd4, %p7")
            p.i("cp.async.cg.shared.global [%%r26+%d], [%%rd4], 16, %%r23" % (i * RA * ROWK))
        for i in range(LB):
            if layout == "bnk":
                p.i("add.u32 %%r21, %%brow, %d" % (i * RB))
                p.i("add.u32 %r22, %k0, %bkc")
                p.i("sub.s32 %r23, %K, %r22")
                p.i("shl.b32 %r23, %r23, 1")
                p.i("min.s32 %r23, %r23, 16")
                p.i("max.s32 %r23, %r23, 0")
                p.i("setp.lt.u32 %p7, %r21, %N")
                p.i("selp.b32 %r23, %r23, 0, %p7")
                p.i("mul.wide.u32 %rd4, %r21, %ldb")
                p.i("cvt.u64.u32 %rd5, %r22")
                p.i("add.u64 %rd4, %rd4, %rd5")
                p.i("shl.b64 %rd4, %rd4, 1")
                p.i("add.u64 %rd4, %rd4, %pb")
                p.i("setp.eq.u32 %p7, %r23, 0")
                p.i("selp.b64 %rd4, %pb, %rd4, %p7")
                p.i("cp.async.cg.shared.global [%%r27+%d], [%%rd4], 16, %%r23" % (i * RB * ROWK))
            else:
                p.i("add.u32 %%r21, %%brow, %d" % (i * RB))
                p.i("add.u32 %r21, %r21, %k0")           # k row
                p.i("sub.s32 %r23, %N, %bkc")
                p.i("shl.b32 %r23, %r23, 1")
                p.i("min.s32 %r23, %r23, 16")
                p.i("max.s32 %r23, %r23, 0")
                p.i("setp.lt.u32 %p7, %r21, %K")
                p.i("selp.b32 %r23, %r23, 0, %p7")
                p.i("mul.wide.u32 %rd4, %r21, %ldb")
                p.i("cvt.u64.u32 %rd5, %bkc")
                p.i("add.u64 %rd4, %rd4, %rd5")
                p.i("shl.b64 %rd4, %rd4, 1")
                p.i("add.u64 %rd4, %rd4, %pb")
                p.i("setp.eq.u32 %p7, %r23, 0")
                p.i("selp.b64 %rd4, %pb, %rd4, %p7")
                p.i("cp.async.cg.shared.global [%%r27+%d], [%%rd4], 16, %%r23" % (i * RB * BROW))
        p.l("%s_DONE" % L)
        p.i("cp.async.commit_group")
        p.i("add.u64 %%asrc, %%asrc, %d" % (BK * 2))
        p.i("add.u64 %bsrc, %bsrc, %btile")

    # ---- fragment offsets
    p.c("ldmatrix addresses (byte offsets inside a stage). A, x4: lane l gives row")
    p.c("wm*%d + (l&15) (+16 per m tile), chunk 2s + (l>>4) for k16 step s = kg*%d + j" % (WTM, J))
    keyk("%r4", "%lane")                              # key of rows = lane (mod 8)
    p.i("and.b32 %r5, %lane, 15")
    p.i("mad.lo.u32 %%r5, %%wm, %d, %%r5" % WTM)
    p.i("mul.lo.u32 %%r5, %%r5, %d" % ROWK)
    p.i("shr.u32 %r6, %lane, 4")
    p.i("mad.lo.u32 %%r6, %%kg, %d, %%r6" % (2 * J))
    for s in range(J):
        p.i("add.u32 %%r7, %%r6, %d" % (2 * s))
        p.i("xor.b32 %r7, %r7, %r4")
        p.i("shl.b32 %r7, %r7, 4")
        p.i("add.u32 %%offa%d, %%r5, %%r7" % s)
    if layout == "bnk":
        p.c("B ([N][%d] like A), x4 over two n8 tiles: lane l gives row" % BK)
        p.c("wn*%d + p*16 + (l&7) + ((l>>4)<<3), chunk 2s + ((l>>3)&1); offb[s] is for p = 0" % WTN)
        p.i("and.b32 %r5, %lane, 7")
        p.i("shr.u32 %r6, %lane, 4")
        p.i("shl.b32 %r6, %r6, 3")
        p.i("add.u32 %r5, %r5, %r6")
        p.i("mad.lo.u32 %%r5, %%wn, %d, %%r5" % WTN)
        p.i("mul.lo.u32 %%r5, %%r5, %d" % ROWK)
        p.i("add.u32 %%r5, %%r5, %d" % A_BYTES)
        p.i("shr.u32 %r6, %lane, 3")
        p.i("and.b32 %r6, %r6, 1")
        p.i("mad.lo.u32 %%r6, %%kg, %d, %%r6" % (2 * J))
        for s in range(J):
            p.i("add.u32 %%r7, %%r6, %d" % (2 * s))
            p.i("xor.b32 %r7, %r7, %r4")
            p.i("shl.b32 %r7, %r7, 4")
            p.i("add.u32 %%offb%d, %%r5, %%r7" % s)
    else:
        p.c("B ([%d][%d], ldmatrix.trans), x4 over two n8 tiles: lane l gives k row" % (BK, BN))
        p.c("16s + (l&7) + (((l>>3)&1)<<3), chunk nc = (wn*%d + p*16)/8 + (l>>4), at nc ^ (l&7);" % WTN)
        p.c("offb[p] is for s = kg*%d (j = 0)" % J)
        p.i("and.b32 %r5, %lane, 7")
        # swizzle key of k row (l&7): k&7 for rows of >= 8 chunks, (k>>1)&3 for 4
        if CPRN >= 8:
            p.i("mov.u32 %r9, %r5")
        else:
            p.i("shr.u32 %r9, %r5, 1")
            p.i("and.b32 %r9, %r9, 3")
        p.i("shr.u32 %r6, %lane, 3")
        p.i("and.b32 %r6, %r6, 1")
        p.i("shl.b32 %r6, %r6, 3")
        p.i("add.u32 %r6, %r6, %r5")
        p.i("mad.lo.u32 %%r6, %%kg, %d, %%r6" % (16 * J))
        p.i("mul.lo.u32 %%r6, %%r6, %d" % BROW)
        p.i("shr.u32 %r7, %lane, 4")
        p.i("mad.lo.u32 %%r7, %%wn, %d, %%r7" % (WTN // 8))
        for pp in range(NP):
            p.i("add.u32 %%r8, %%r7, %d" % (pp * 2))
            p.i("xor.b32 %r8, %r8, %r9")
            p.i("shl.b32 %r8, %r8, 4")
            p.i("add.u32 %r8, %r8, %r6")
            p.i("add.u32 %%offb%d, %%r8, %d" % (pp, A_BYTES))

    p.c("zero accumulators")
    for j in range(MT * NT8 * 4):
        p.i("mov.f32 %%acc%d, 0f00000000" % j)
    p.c("---- prologue: K tiles 0..%d into stages 0..%d (tiles past K are zero-filled)" % (STAGES - 2, STAGES - 2))
    for s in range(STAGES - 1):
        p.i("mov.u32 %%ws, %d" % s)
        p.i("mov.u32 %%k0, %d" % (s * BK))
        issue_tile()
    p.i("mov.u32 %rs, 0")
    p.i("mov.u32 %%ws, %d" % (STAGES - 1))
    p.i("mov.u32 %kt, 0")
    p.c("---- main loop: wait for tile kt, barrier (everyone is done with tile kt-1's")
    p.c("stage), refill that stage with tile kt+%d, multiply tile kt" % (STAGES - 1))
    p.l("%s_LOOP" % tag)
    p.i("cp.async.wait_group %d" % (STAGES - 2))
    p.i("bar.sync 0")
    p.i("add.u32 %%k0, %%kt, %d" % (STAGES - 1))
    p.i("shl.b32 %%k0, %%k0, %d" % log2(BK))
    issue_tile()
    p.i("mul.lo.u32 %%r24, %%rs, %d" % STAGE)
    p.i("add.u32 %r24, %r24, %sbase")
    for s in range(J):
        par = s % 2
        p.c("k16 step kg*%d + %d" % (J, s))
        p.i("add.u32 %%r25, %%r24, %%offa%d" % s)
        for mt in range(MT):
            fa = ["%%fa%d" % (par * MT * 4 + mt * 4 + j) for j in range(4)]
            p.i("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%s, %s, %s, %s}, [%%r25+%d]" % (tuple(fa) + (mt * 16 * ROWK,)))
        for pp in range(NP):
            fb = ["%%fb%d" % (par * NP * 4 + pp * 4 + j) for j in range(4)]
            if layout == "bnk":
                if pp == 0:
                    p.i("add.u32 %%r25, %%r24, %%offb%d" % s)
                off = pp * 16 * ROWK
                tr = ""
            else:
                p.i("add.u32 %%r25, %%r24, %%offb%d" % pp)
                off = s * 16 * BROW
                tr = ".trans"
            p.i("ldmatrix.sync.aligned.m8n8.x4%s.shared.b16 {%s, %s, %s, %s}, [%%r25+%d]" % ((tr,) + tuple(fb) + (off,)))
        for mt in range(MT):
            for nt in range(NT8):
                a = ["%%fa%d" % (par * MT * 4 + mt * 4 + j) for j in range(4)]
                bi = par * NP * 4 + (nt // 2) * 4 + (nt % 2) * 2
                b = ["%%fb%d" % bi, "%%fb%d" % (bi + 1)]
                c = ["%%acc%d" % ((mt * NT8 + nt) * 4 + j) for j in range(4)]
                p.i("%s {%s, %s, %s, %s}, {%s, %s, %s, %s}, {%s, %s}, {%s, %s, %s, %s}" % (
                    (mma,) + tuple(c) + tuple(a) + tuple(b) + tuple(c)))
    p.i("add.u32 %rs, %rs, 1")
    p.i("setp.eq.u32 %%p0, %%rs, %d" % STAGES)
    p.i("selp.b32 %rs, 0, %rs, %p0")
    p.i("add.u32 %ws, %ws, 1")
    p.i("setp.eq.u32 %%p0, %%ws, %d" % STAGES)
    p.i("selp.b32 %ws, 0, %ws, %p0")
    p.i("add.u32 %kt, %kt, 1")
    p.i("setp.lt.u32 %p0, %kt, %nk")
    p.i("@%%p0 bra %s_LOOP" % tag)
    p.c("drain every copy (the zero-filled tail tiles too) before reusing shared memory")
    p.i("cp.async.wait_group 0")
    p.i("bar.sync 0")
    p.c("---- stage accumulators: MMA tile (mt, nt) element pairs (c0,c1) at row")
    p.c("wm*%d + mt*16 + l/4, cols wn*%d + nt*8 + 2*(l%%4); (c2,c3) 8 rows below" % (WTM, WTN))
    p.i("shr.u32 %r0, %lane, 2")
    p.i("mad.lo.u32 %%r0, %%wm, %d, %%r0" % WTM)
    p.i("mul.lo.u32 %%r0, %%r0, %d" % (SE * 4))
    p.i("and.b32 %r1, %lane, 3")
    p.i("shl.b32 %r1, %r1, 1")
    p.i("mad.lo.u32 %%r1, %%wn, %d, %%r1" % WTN)
    p.i("shl.b32 %r1, %r1, 2")
    p.i("add.u32 %r0, %r0, %r1")
    p.i("mad.lo.u32 %%r0, %%kg, %d, %%r0" % (BM * SE * 4))
    p.i("add.u32 %r0, %r0, %sbase")
    for mt in range(MT):
        for nt in range(NT8):
            c = (mt * NT8 + nt) * 4
            off = (mt * 16 * SE + nt * 8) * 4
            p.i("st.shared.v2.f32 [%%r0+%d], {%%acc%d, %%acc%d}" % (off, c, c + 1))
            p.i("st.shared.v2.f32 [%%r0+%d], {%%acc%d, %%acc%d}" % (off + 8 * SE * 4, c + 2, c + 3))
    p.i("bar.sync 0")
    gen_epilogue(p, tag, BM, BN, NT, SE, None if c32 else dt, KS)
    p.raw("}")
    return name, NT, SMEM


# ---------------------------------------------------------------------------
# fp16 / bf16 warpgroup-MMA kernel (sm_90a), B stored [N, K]
# ---------------------------------------------------------------------------
# Matrix descriptor bits other than the start address: 128-byte swizzle (bits
# 62-63 = 1), stride byte offset 1024 >> 4 = 64 (bits 32-45: the distance
# between 8-row groups), leading byte offset 1 (bits 16-29; unused by swizzled
# K-major layouts).
DESC_HI = (1 << 62) | (64 << 32) | (1 << 16)


def gen_wgmma(p, dt, BM, BN, STAGES=4, c32=False):
    """c32: C, bias and residual in fp32 (the "_c32" kernels), not in dt."""
    BK = 64
    NWG = BM // 64
    NT = NWG * 128
    NACC = BN // 2                      # fp32 accumulators a thread
    D = STAGES - 2                      # K tiles in flight ahead of the multiplied one
    A_BYTES = BM * BK * 2
    B_BYTES = BN * BK * 2
    STAGE = A_BYTES + B_BYTES
    SE = BN + 8
    SMEM = max(STAGES * STAGE, BM * SE * 4 + BN * 4) + 1024
    RA = NT // 8                        # rows between a thread's chunks
    LA, LB = BM // RA, BN // RA
    assert BM % 64 == 0 and BN % 8 == 0 and 8 <= BN <= 256 and STAGE % 1024 == 0
    assert RA % 8 == 0 and LA * RA == BM and LB * RA == BN and D >= 1
    name = "gemm_%s_bnk_wg%dx%d%s" % (dt, BM, BN, "_c32" if c32 else "")
    tag = "W" + name.upper().replace("GEMM_", "").replace("_", "")
    wg = "wgmma.mma_async.sync.aligned.m64n%dk16.f32.%s.%s" % (BN, dt, dt)
    accs = ", ".join("%%acc%d" % j for j in range(NACC))

    p.raw("")
    p.raw("// " + "-" * 76)
    p.raw("// %s (sm_90a): %s wgmma, B stored [N, K]%s. Block tile %dx%dx%d," % (
        name, dt, "; C, bias, residual fp32" if c32 else "", BM, BN, BK))
    p.raw("// %d warpgroup(s) = %d threads; warpgroup g multiplies rows 64g..64g+63 by all" % (NWG, NT))
    p.raw("// %d columns: per K tile 4 x %s." % (BN, wg.replace("wgmma.mma_async.sync.aligned.", "")))
    p.raw("// %d-stage cp.async pipeline, stage = A %d B + B %d B (1024-byte aligned);" % (STAGES, A_BYTES, B_BYTES))
    p.raw("// dynamic shared memory %d bytes (1 KiB of it for the alignment; the" % SMEM)
    p.raw("// epilogue's [%d][%d] float tile reuses the stages)." % (BM, SE))
    p.raw("// " + "-" * 76)
    p.raw(".visible .entry " + name + PARAMS)
    p.raw(".maxntid %d, 1, 1" % NT)
    p.raw("{")
    common_regs(p)
    epi_regs(p, dt)
    p.raw("    .reg .f32 %%acc<%d>;" % NACC)
    p.raw("    .reg .b32 %lane, %wg, %rs, %ws, %k0;")
    p.raw("    .reg .b32 %adst, %bdst, %arow, %akc, %brow, %bkc;")
    p.raw("    .reg .b64 %asrc, %bsrc, %astep, %bstep, %desca, %descb;")
    p.raw("    .reg .pred %interior, %ptrue;")
    p.raw("")
    gen_params(p, 2, 4 if c32 else 2)
    block_origin(p, BM, BN)
    p.c("1024-byte aligned base: the 128-byte swizzle repeats every 1024 bytes and")
    p.c("the descriptors assume that its pattern starts at each stage (the launcher")
    p.c("adds 1 KiB to the dynamic shared memory for this)")
    p.i("add.u32 %sbase, %sbase, 1023")
    p.i("and.b32 %sbase, %sbase, -1024")
    p.i("and.b32 %lane, %thr, 31")
    p.i("shr.u32 %wg, %thr, 7")
    p.i("setp.eq.u32 %ptrue, %thr, %thr")
    p.i("add.u32 %%nk, %%K, %d" % (BK - 1))
    p.i("shr.u32 %%nk, %%nk, %d" % log2(BK))
    p.c("interior = the block tile lies inside M and N (then only K needs checks)")
    p.i("add.u32 %%r0, %%m0, %d" % BM)
    p.i("setp.le.u32 %interior, %r0, %M")
    p.i("add.u32 %%r0, %%n0, %d" % BN)
    p.i("setp.le.u32 %p0, %r0, %N")
    p.i("and.pred %interior, %interior, %p0")

    p.c("A tile (%d rows x 64 halves = 8 16-byte chunks a row): thread t copies chunk" % BM)
    p.c("c = t%%8 of rows t/8 + i*%d (i < %d), stored at row*128 + ((c ^ (row&7))*16) (the" % (RA, LA))
    p.c("same key for all i). asrc = &A[m0 + t/8][c*8] of the next K tile")
    for (X, dst, row, kc, src, step, base, org, ld, off) in (
            ("A", "%adst", "%arow", "%akc", "%asrc", "%astep", "%pa", "%m0", "%lda", 0),
            ("B", "%bdst", "%brow", "%bkc", "%bsrc", "%bstep", "%pb", "%n0", "%ldb", A_BYTES)):
        if X == "B":
            p.c("B tile ([N, K] rows n, %d of them): same mapping as A, after A in the stage" % BN)
        p.i("shr.u32 %r1, %thr, 3")
        p.i("and.b32 %r2, %thr, 7")
        p.i("and.b32 %r3, %r1, 7")
        p.i("xor.b32 %r3, %r3, %r2")
        p.i("shl.b32 %r3, %r3, 4")
        p.i("mad.lo.u32 %s, %%r1, 128, %%r3" % dst)
        if off:
            p.i("add.u32 %s, %s, %d" % (dst, dst, off))
        p.i("shl.b32 %s, %%r2, 3" % kc)
        p.i("add.u32 %s, %%r1, %s" % (row, org))
        p.i("mul.wide.u32 %%rd2, %s, %s" % (row, ld))
        p.i("cvt.u64.u32 %%rd3, %s" % kc)
        p.i("add.u64 %rd2, %rd2, %rd3")
        p.i("shl.b64 %rd2, %rd2, 1")
        p.i("add.u64 %s, %s, %%rd2" % (src, base))
        p.i("mul.wide.u32 %s, %s, %d" % (step, ld, RA * 2))

    lblc = [0]

    def issue_tile():
        """cp.async of the K tile at %k0 into stage %ws (nothing for a tile past
        K); commits a group either way; advances asrc/bsrc."""
        lblc[0] += 1
        L = "%s_I%d" % (tag, lblc[0])
        p.i("mul.lo.u32 %%r20, %%ws, %d" % STAGE)
        p.i("add.u32 %r20, %r20, %sbase")
        p.i("add.u32 %r26, %r20, %adst")
        p.i("add.u32 %r27, %r20, %bdst")
        p.c("a tile past K is never multiplied: copy nothing (an empty group)")
        p.i("setp.ge.u32 %p9, %k0, %K")
        p.i("@%%p9 bra %s_DONE" % L)
        p.c("fast path: interior block and the whole K tile inside K")
        p.i("add.u32 %%r21, %%k0, %d" % BK)
        p.i("setp.le.u32 %p8, %r21, %K")
        p.i("and.pred %p8, %p8, %interior")
        p.i("@!%%p8 bra %s_SLOW" % L)
        for (n, dreg, src, step) in ((LA, "%r26", "%asrc", "%astep"), (LB, "%r27", "%bsrc", "%bstep")):
            p.i("mov.u64 %%rd4, %s" % src)
            for i in range(n):
                p.i("cp.async.cg.shared.global [%s+%d], [%%rd4], 16" % (dreg, i * RA * 128))
                if i + 1 < n:
                    p.i("add.u64 %%rd4, %%rd4, %s" % step)
        p.i("bra.uni %s_DONE" % L)
        p.l("%s_SLOW" % L)
        p.c("slow path: per chunk, bytes = 16 inside, 0..14 on the K edge, 0 outside M")
        p.c("(N) or K (zero fill); a chunk with 0 bytes reads nothing and gets the")
        p.c("matrix base address")
        for (n, dreg, row, kc, lim, ld, base) in ((LA, "%r26", "%arow", "%akc", "%M", "%lda", "%pa"),
                                                  (LB, "%r27", "%brow", "%bkc", "%N", "%ldb", "%pb")):
            for i in range(n):
                p.i("add.u32 %%r21, %s, %d" % (row, i * RA))
                p.i("add.u32 %%r22, %%k0, %s" % kc)
                p.i("sub.s32 %r23, %K, %r22")
                p.i("shl.b32 %r23, %r23, 1")
                p.i("min.s32 %r23, %r23, 16")
                p.i("max.s32 %r23, %r23, 0")
                p.i("setp.lt.u32 %%p7, %%r21, %s" % lim)
                p.i("selp.b32 %r23, %r23, 0, %p7")
                p.i("mul.wide.u32 %%rd4, %%r21, %s" % ld)
                p.i("cvt.u64.u32 %rd5, %r22")
                p.i("add.u64 %rd4, %rd4, %rd5")
                p.i("shl.b64 %rd4, %rd4, 1")
                p.i("add.u64 %%rd4, %%rd4, %s" % base)
                p.i("setp.eq.u32 %p7, %r23, 0")
                p.i("selp.b64 %%rd4, %s, %%rd4, %%p7" % base)
                p.i("cp.async.cg.shared.global [%s+%d], [%%rd4], 16, %%r23" % (dreg, i * RA * 128))
        p.l("%s_DONE" % L)
        p.i("cp.async.commit_group")
        p.i("add.u64 %%asrc, %%asrc, %d" % (BK * 2))
        p.i("add.u64 %%bsrc, %%bsrc, %d" % (BK * 2))

    p.c("zero accumulators")
    for j in range(NACC):
        p.i("mov.f32 %%acc%d, 0f00000000" % j)
    p.c("---- prologue: K tiles 0..%d into stages 0..%d" % (D - 1, D - 1))
    for s_ in range(D):
        p.i("mov.u32 %%ws, %d" % s_)
        p.i("mov.u32 %%k0, %d" % (s_ * BK))
        issue_tile()
    p.i("mov.u32 %rs, 0")
    p.i("mov.u32 %%ws, %d" % D)
    p.i("mov.u32 %kt, 0")
    p.c("---- main loop over K tiles kt (stage rs = kt %% %d, refilled stage ws = (kt+%d) %% %d)" % (STAGES, D, STAGES))
    p.l("%s_LOOP" % tag)
    p.c("own copies of tile kt done; make them visible to the async proxy (wgmma);")
    p.c("barrier: everyone's copies of tile kt are done, and every warpgroup has")
    p.c("retired the wgmma of tile kt-2 (wait_group 1 below), whose stage ws is refilled")
    p.i("cp.async.wait_group %d" % (D - 1))
    p.i("fence.proxy.async.shared::cta")
    p.i("bar.sync 0")
    p.i("add.u32 %%k0, %%kt, %d" % D)
    p.i("shl.b32 %%k0, %%k0, %d" % log2(BK))
    issue_tile()
    p.c("descriptors of this warpgroup's A rows and of B in stage rs")
    p.i("mul.lo.u32 %%r24, %%rs, %d" % STAGE)
    p.i("add.u32 %r24, %r24, %sbase")
    p.i("mad.lo.u32 %%r25, %%wg, %d, %%r24" % (64 * BK * 2))
    p.i("cvt.u64.u32 %desca, %r25")
    p.i("shr.u64 %desca, %desca, 4")
    p.i("or.b64 %%desca, %%desca, 0x%016X" % DESC_HI)
    p.i("add.u32 %%r25, %%r24, %d" % A_BYTES)
    p.i("cvt.u64.u32 %descb, %r25")
    p.i("shr.u64 %descb, %descb, 4")
    p.i("or.b64 %%descb, %%descb, 0x%016X" % DESC_HI)
    p.i("wgmma.fence.sync.aligned")
    for j in range(BK // 16):
        p.c("k16 step %d: start addresses + %d bytes" % (j, 32 * j))
        if j == 0:
            da, db = "%desca", "%descb"
        else:
            p.i("add.s64 %%rd6, %%desca, %d" % (2 * j))
            p.i("add.s64 %%rd7, %%descb, %d" % (2 * j))
            da, db = "%rd6", "%rd7"
        p.i("%s {%s}, %s, %s, %%ptrue, 1, 1, 0, 0" % (wg, accs, da, db))
    p.i("wgmma.commit_group.sync.aligned")
    p.i("wgmma.wait_group.sync.aligned 1")
    p.i("add.u32 %rs, %rs, 1")
    p.i("setp.eq.u32 %%p0, %%rs, %d" % STAGES)
    p.i("selp.b32 %rs, 0, %rs, %p0")
    p.i("add.u32 %ws, %ws, 1")
    p.i("setp.eq.u32 %%p0, %%ws, %d" % STAGES)
    p.i("selp.b32 %ws, 0, %ws, %p0")
    p.i("add.u32 %kt, %kt, 1")
    p.i("setp.lt.u32 %p0, %kt, %nk")
    p.i("@%%p0 bra %s_LOOP" % tag)
    p.c("retire every wgmma and drain every copy before reusing shared memory")
    p.i("wgmma.wait_group.sync.aligned 0")
    p.i("cp.async.wait_group 0")
    p.i("bar.sync 0")
    p.c("---- stage accumulators: warp w of warpgroup g, lane l holds, for n8 block j,")
    p.c("(acc[4j], acc[4j+1]) at row 64g + 16w + l/4, cols 8j + 2*(l%4) .. +1, and")
    p.c("(acc[4j+2], acc[4j+3]) 8 rows below")
    p.i("shr.u32 %r0, %thr, 5")
    p.i("and.b32 %r0, %r0, 3")
    p.i("shl.b32 %r0, %r0, 4")
    p.i("mad.lo.u32 %r0, %wg, 64, %r0")
    p.i("shr.u32 %r1, %lane, 2")
    p.i("add.u32 %r0, %r0, %r1")
    p.i("mul.lo.u32 %%r0, %%r0, %d" % (SE * 4))
    p.i("and.b32 %r1, %lane, 3")
    p.i("shl.b32 %r1, %r1, 3")
    p.i("add.u32 %r0, %r0, %r1")
    p.i("add.u32 %r0, %r0, %sbase")
    for j in range(BN // 8):
        p.i("st.shared.v2.f32 [%%r0+%d], {%%acc%d, %%acc%d}" % (j * 32, 4 * j, 4 * j + 1))
        p.i("st.shared.v2.f32 [%%r0+%d], {%%acc%d, %%acc%d}" % (8 * SE * 4 + j * 32, 4 * j + 2, 4 * j + 3))
    p.i("bar.sync 0")
    gen_epilogue(p, tag, BM, BN, NT, SE, None if c32 else dt, 1, bias_smem=BM * SE * 4)
    p.raw("}")
    return name, NT, SMEM


# The wgmma tiles (BM, BN); src/kernels/gemm.rs lists the same.
WG_TILES = ((128, 128), (128, 192), (128, 256), (64, 128))

MARKER = "// ==== sm_90a only: the wgmma kernels (not in the sm_90 module) ===="


def main():
    p = Ptx()
    p.raw(HEADER)
    p.raw(".version 8.0")
    p.raw(".target sm_90a")
    p.raw(".address_size 64")
    p.raw("/*")
    p.raw("@@S90@@.version 8.0")
    p.raw(".target sm_90")
    p.raw(".address_size 64")
    p.raw("//*/")
    p.raw("")
    p.raw("// Dynamic shared memory of every kernel (16-byte aligned; the wgmma kernels")
    p.raw("// align their base to 1024 bytes themselves).")
    p.raw(".extern .shared .align 16 .b8 smem[];")
    gen_act(p)
    table = []
    for layout in ("bkn", "bnk"):
        table.append(gen_f32(p, layout, 128, 128, KS=1))
        table.append(gen_f32(p, layout, 128, 64, KS=2))
    for dt in ("f16", "bf16"):
        for layout in ("bkn", "bnk"):
            table.append(gen_half(p, dt, layout, 128, 128, 32, 2, 2, 4, KS=1))
            table.append(gen_half(p, dt, layout, 64, 64, 64, 1, 1, 4, KS=4))
            table.append(gen_half(p, dt, layout, 64, 32, 64, 1, 1, 4, KS=4))
    for dt in ("f16", "bf16"):
        table.append(gen_half(p, dt, "bnk", 128, 128, 32, 2, 2, 4, KS=1, c32=True))
        table.append(gen_half(p, dt, "bnk", 64, 64, 64, 1, 1, 4, KS=4, c32=True))
        table.append(gen_half(p, dt, "bnk", 64, 32, 64, 1, 1, 4, KS=4, c32=True))
    p.raw("")
    p.raw("@@E90@@" + MARKER)
    wgt = []
    for dt in ("f16", "bf16"):
        for (bm, bn) in WG_TILES:
            t = gen_wgmma(p, dt, bm, bn)
            table.append(t)
            table.append(gen_wgmma(p, dt, bm, bn, c32=True))
            if dt == "f16":
                wgt.append("//   gemm_{f16,bf16}_bnk_wg%dx%d  %3d threads, %6d B (%d warpgroup%s)" % (
                    bm, bn, t[1], t[2], bm // 64, "s" if bm > 64 else ""))
    text = p.text().replace("@@WGTABLE@@", "\n".join(wgt))
    s90 = text.index("@@S90@@")
    text = text.replace("@@S90@@", "", 1)
    e90 = text.index("@@E90@@")
    text = text.replace("@@E90@@", "", 1)
    first = "[@@@@@@@@@@, ##########)"
    assert text.count(first) == 1
    text = text.replace(first, "[%010d, %010d)" % (s90, e90), 1)
    assert text[s90:].startswith(".version 8.0\n.target sm_90\n") and text[e90:].startswith(MARKER)
    sys.stdout.write(text)
    for t in table:
        sys.stderr.write("%s threads=%d smem=%d\n" % t)


main()
