// bfloat16 attention for CPUs with AVX512-BF16 (see cpu_kernels.py): a causal prefill over a whole prompt
// (fused_prefill_attention) and a decode step's one query token over the cache (fused_decode_attention).
//
// Prefill is flash-style: per key head and block of query tokens, the logits of one key block at a time go through
// an online softmax in float32 and straight into the output accumulator, so the [tokens x keys] matrix is never
// written out. Both matrix products are oneDNN's bfloat16 batch-reduce GEMMs (at::native::cpublas::brgemm) on
// operands packed in VNNI layout (pairs along the reduction dimension interleaved), the layout its AVX512-BF16
// kernels read at full speed.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;

// Rounds 16 floats to bfloat16 (nearest even, as PyTorch does) and stores them at `out`.
static void store_bfloat16(const Vec& values, BFloat16* out) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(values));
}

// queries: [B, KV, n, group, d] (scaled); keys: [B, KV, key_blocks, d/2, key_block, 2];
// values: [B, KV, key_blocks * key_block / 2, d, 2]; returns [B, n, KV * group, d].
torch::Tensor causal_attention(torch::Tensor queries, torch::Tensor keys, torch::Tensor values, int64_t query_block) {
  TORCH_CHECK(queries.scalar_type() == at::kBFloat16 && queries.is_contiguous() && keys.is_contiguous() &&
              values.is_contiguous() && queries.dim() == 5 && keys.dim() == 6);
  const int64_t batch = queries.size(0), kv_heads = queries.size(1), length = queries.size(2);
  const int64_t group = queries.size(3), dim = queries.size(4), key_block = keys.size(4);
  const int64_t key_blocks = keys.size(2), query_blocks = (length + query_block - 1) / query_block;
  TORCH_CHECK(dim % Vec::size() == 0 && key_block % Vec::size() == 0 && key_blocks * key_block >= length);
  auto output = torch::empty({batch, length, kv_heads * group, dim}, queries.options());
  const BFloat16* q_data = queries.data_ptr<BFloat16>();
  const BFloat16* k_data = keys.data_ptr<BFloat16>();
  const BFloat16* v_data = values.data_ptr<BFloat16>();
  BFloat16* out_data = output.data_ptr<BFloat16>();
  const int64_t items = batch * kv_heads * query_blocks;
  const float minus_inf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, items, 1, [&](int64_t first, int64_t last) {
    const int64_t max_rows = query_block * group;
    std::vector<float> logits(max_rows * key_block), accumulator(max_rows * dim), row_max(max_rows), row_sum(max_rows);
    std::vector<BFloat16> probs(max_rows * key_block);
    for (int64_t item = first; item < last; item++) {
      // Items alternate cheap and costly query blocks (k, last - k, ...) so static chunks balance across threads.
      const int64_t head = item / query_blocks % kv_heads, b = item / (query_blocks * kv_heads);
      const int64_t slot = item % query_blocks;
      const int64_t block = slot % 2 == 0 ? slot / 2 : query_blocks - 1 - slot / 2;
      const int64_t start = block * query_block, tokens = std::min(query_block, length - start);
      const int64_t rows = tokens * group;
      const BFloat16* q = q_data + ((b * kv_heads + head) * length + start) * group * dim;
      std::fill(accumulator.begin(), accumulator.begin() + rows * dim, 0.f);
      std::fill(row_max.begin(), row_max.begin() + rows, minus_inf);
      std::fill(row_sum.begin(), row_sum.begin() + rows, 0.f);
      const int64_t last_key = start + tokens - 1;
      for (int64_t kb = 0; kb * key_block <= last_key; kb++) {
        const int64_t key_start = kb * key_block;
        const BFloat16* k = k_data + ((b * kv_heads + head) * key_blocks + kb) * dim * key_block;
        at::native::cpublas::brgemm(rows, key_block, dim, dim, key_block, key_block, false, q, k, logits.data(),
                                    true);
        for (int64_t r = 0; r < rows; r++) {
          float* s = logits.data() + r * key_block;
          BFloat16* p = probs.data() + r * key_block;
          const int64_t visible = std::min(key_block, start + r / group - key_start + 1);  // causal
          if (visible <= 0) {
            std::fill(p, p + key_block, BFloat16(0.f));
            continue;
          }
          std::fill(s + visible, s + key_block, minus_inf);
          Vec block_max(minus_inf);
          for (int64_t j = 0; j < key_block; j += Vec::size()) block_max = at::vec::maximum(block_max, Vec::loadu(s + j));
          const float new_max = std::max(row_max[r], _mm512_reduce_max_ps(block_max));
          Vec total(0.f), shift(new_max);
          for (int64_t j = 0; j < key_block; j += Vec::size()) {
            const Vec exp = (Vec::loadu(s + j) - shift).exp_u20();
            total = total + exp;
            store_bfloat16(exp, p + j);
          }
          if (new_max > row_max[r]) {  // rescale what earlier blocks summed to the new maximum
            const float rescale = std::exp(row_max[r] - new_max);
            row_sum[r] *= rescale;
            float* acc = accumulator.data() + r * dim;
            for (int64_t j = 0; j < dim; j += Vec::size()) (Vec::loadu(acc + j) * Vec(rescale)).store(acc + j);
            row_max[r] = new_max;
          }
          row_sum[r] += _mm512_reduce_add_ps(total);
        }
        const BFloat16* v = v_data + ((b * kv_heads + head) * key_blocks * key_block + key_start) * dim;
        at::native::cpublas::brgemm(rows, dim, key_block, key_block, dim, dim, true, probs.data(), v,
                                    accumulator.data(), true);
      }
      for (int64_t r = 0; r < rows; r++) {
        const int64_t token = start + r / group, query_head = head * group + r % group;
        BFloat16* out = out_data + ((b * length + token) * kv_heads * group + query_head) * dim;
        const float* acc = accumulator.data() + r * dim;
        const Vec inverse(1.f / row_sum[r]);
        for (int64_t j = 0; j < dim; j += Vec::size()) store_bfloat16(Vec::loadu(acc + j) * inverse, out + j);
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
  return output;
}

// A decode step reads every cached key and value once, so it runs at the speed of memory if the arithmetic keeps
// up. Split-K ("flash decoding"): each key head's cache is cut into chunks, one work item each, so that even one
// sequence with a few key heads keeps every thread busy; each item writes its chunk's softmax maximum, sum and
// unnormalised output per query head, and a last pass combines the chunks.

// 16 bfloat16 at `in` as floats (a bfloat16 is a float's upper half).
static inline __m512 load_bfloat16(const BFloat16* in) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Lane j of the result: the sum of d[j]'s 16 lanes. Sixteen horizontal sums at once take 45 instructions, against
// about 8 each one at a time.
static inline __m512 sum_lanes(const __m512 d[16]) {
  __m512 pairs[8], quads[4], octets[2];
  for (int i = 0; i < 8; i++)  // each 128-bit lane: a partial sum of d[2i], of d[2i+1], of d[2i], of d[2i+1]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(d[2 * i], d[2 * i + 1]), _mm512_unpackhi_ps(d[2 * i], d[2 * i + 1]));
  for (int i = 0; i < 4; i++) {  // each 128-bit lane: a partial sum of each of d[4i..4i+3]
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; i++)  // 128-bit lanes 0-1: halves of the sums of d[8i..8i+3]; lanes 2-3: of d[8i+4..8i+7]
    octets[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(octets[0], octets[1], 0x88),
                       _mm512_shuffle_f32x4(octets[0], octets[1], 0xDD));
}

// Query heads per pass over a chunk's keys: their queries and output accumulators stay in registers.
constexpr int64_t PASS_HEADS = 4;
constexpr int64_t MAX_DIM = 256;

// The scaled logits of `heads` query heads over `width` keys (rows of `dim`), plus the mask's row, into
// logits[h * stride + j]; lanes past `width` up to the next multiple of 16 get -inf.
static void chunk_logits(const BFloat16* queries, int64_t heads, const BFloat16* keys, int64_t width, int64_t dim,
                         float scale, const float* mask, float* logits, int64_t stride) {
  const int64_t vecs = (dim + 31) / 32;  // 32 bfloat16 (16 pairs) per dot-product instruction
  const __mmask32 tail = dim % 32 == 0 ? ~0u : (1u << (dim % 32)) - 1;
  __m512bh q[PASS_HEADS][MAX_DIM / 32];
  for (int64_t h = 0; h < heads; h++)
    for (int64_t x = 0; x < vecs; x++)
      q[h][x] = (__m512bh)_mm512_maskz_loadu_epi16(x == vecs - 1 ? tail : ~0u, queries + h * dim + x * 32);
  for (int64_t start = 0; start < width; start += 16) {
    const int64_t n = std::min<int64_t>(16, width - start);
    const __mmask16 live = n == 16 ? 0xFFFF : (1u << n) - 1;
    const __m512 bias = mask ? _mm512_maskz_loadu_ps(live, mask + start) : _mm512_setzero_ps();
    for (int64_t h = 0; h < heads; h++) {  // the 16 keys stay in L1 across the heads
      __m512 dot[16];
      for (int64_t j = 0; j < 16; j++) {
        dot[j] = _mm512_setzero_ps();
        for (int64_t x = 0; j < n && x < vecs; x++) {
          const __m512i key = _mm512_maskz_loadu_epi16(x == vecs - 1 ? tail : ~0u, keys + (start + j) * dim + x * 32);
          dot[j] = _mm512_dpbf16_ps(dot[j], q[h][x], (__m512bh)key);
        }
      }
      const __m512 block = _mm512_fmadd_ps(sum_lanes(dot), _mm512_set1_ps(scale), bias);
      const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      _mm512_storeu_ps(logits + h * stride + start, _mm512_mask_blend_ps(live, minus_inf, block));
    }
  }
}

// Turns a row of logits into exponentials of their difference to its maximum, in place; returns {maximum, sum}.
// A row that is all -inf (a chunk the mask hides) gives zeros and {-inf, 0}.
static std::pair<float, float> exponentials(float* row, int64_t width) {
  const int64_t padded = (width + 15) / 16 * 16;  // chunk_logits filled the lanes past `width` with -inf
  Vec top(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < padded; j += Vec::size()) top = at::vec::maximum(top, Vec::loadu(row + j));
  const float maximum = _mm512_reduce_max_ps(top);
  if (maximum == -std::numeric_limits<float>::infinity()) {
    std::fill(row, row + padded, 0.f);
    return {maximum, 0.f};
  }
  Vec total(0.f), shift(maximum);
  for (int64_t j = 0; j < padded; j += Vec::size()) {
    const Vec exp = (Vec::loadu(row + j) - shift).exp_u20();
    exp.store(row + j);
    total = total + exp;
  }
  return {maximum, _mm512_reduce_add_ps(total)};
}

// queries: [B, KV, group, d]; keys, values: [B, KV, L, d], each head's rows contiguous (a prefix of a longer
// cache buffer is fine); mask: [B, L] additive float, or empty. Returns [B, KV * group, d].
torch::Tensor decode_attention(torch::Tensor queries, torch::Tensor keys, torch::Tensor values, torch::Tensor mask,
                               double scale, int64_t chunk) {
  TORCH_CHECK(queries.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16 &&
              values.scalar_type() == at::kBFloat16 && queries.is_contiguous() && queries.dim() == 4);
  const int64_t batch = queries.size(0), kv_heads = queries.size(1), group = queries.size(2), dim = queries.size(3);
  const int64_t length = keys.size(2), chunks = (length + chunk - 1) / chunk;
  TORCH_CHECK(dim % Vec::size() == 0 && dim <= MAX_DIM && chunk % 16 == 0 && length > 0);
  TORCH_CHECK(keys.stride(3) == 1 && keys.stride(2) == dim && values.stride(3) == 1 && values.stride(2) == dim);
  const bool masked = mask.numel() > 0;
  TORCH_CHECK(!masked || (mask.scalar_type() == at::kFloat && mask.is_contiguous() && mask.numel() == batch * length));
  // Per (sequence, key head, chunk, query head): the chunk's maximum logit, its sum of exponentials and its
  // unnormalised output.
  const int64_t slots = batch * kv_heads * chunks * group;
  std::vector<float> chunk_max(slots), chunk_sum(slots), chunk_out(slots * dim);
  const BFloat16* q_data = queries.data_ptr<BFloat16>();
  const BFloat16* k_data = keys.data_ptr<BFloat16>();
  const BFloat16* v_data = values.data_ptr<BFloat16>();
  const float* m_data = masked ? mask.data_ptr<float>() : nullptr;
  const int64_t vecs = dim / Vec::size();

  at::parallel_for(0, batch * kv_heads * chunks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> logits(PASS_HEADS * chunk);
    for (int64_t item = first; item < last; item++) {
      const int64_t c = item % chunks, head = item / chunks % kv_heads, b = item / (chunks * kv_heads);
      const int64_t start = c * chunk, width = std::min(chunk, length - start);
      const BFloat16* k = k_data + b * keys.stride(0) + head * keys.stride(1) + start * dim;
      const BFloat16* v = v_data + b * values.stride(0) + head * values.stride(1) + start * dim;
      for (int64_t first_head = 0; first_head < group; first_head += PASS_HEADS) {
        const int64_t heads = std::min(PASS_HEADS, group - first_head);
        const int64_t slot = item * group + first_head;  // items run over (b, head, c): slots follow them
        chunk_logits(q_data + ((b * kv_heads + head) * group + first_head) * dim, heads, k, width, dim, scale,
                     masked ? m_data + b * length + start : nullptr, logits.data(), chunk);
        for (int64_t h = 0; h < heads; h++)
          std::tie(chunk_max[slot + h], chunk_sum[slot + h]) = exponentials(logits.data() + h * chunk, width);
        __m512 out[PASS_HEADS][MAX_DIM / 16];
        for (int64_t h = 0; h < heads; h++)
          for (int64_t x = 0; x < vecs; x++) out[h][x] = _mm512_setzero_ps();
        for (int64_t j = 0; j < width; j++)
          for (int64_t x = 0; x < vecs; x++) {
            const __m512 value = load_bfloat16(v + j * dim + x * 16);
            for (int64_t h = 0; h < heads; h++)
              out[h][x] = _mm512_fmadd_ps(_mm512_set1_ps(logits[h * chunk + j]), value, out[h][x]);
          }
        for (int64_t h = 0; h < heads; h++)
          for (int64_t x = 0; x < vecs; x++) _mm512_storeu_ps(chunk_out.data() + (slot + h) * dim + x * 16, out[h][x]);
      }
    }
  });

  auto output = torch::empty({batch, kv_heads * group, dim}, queries.options());
  BFloat16* out_data = output.data_ptr<BFloat16>();
  at::parallel_for(0, batch * kv_heads * group, 1, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; row++) {  // row: (b, head, query head)
      const int64_t first_slot = row / group * chunks * group + row % group;
      float maximum = -std::numeric_limits<float>::infinity(), total = 0.f;
      for (int64_t c = 0; c < chunks; c++) maximum = std::max(maximum, chunk_max[first_slot + c * group]);
      std::vector<Vec> out(vecs, Vec(0.f));
      for (int64_t c = 0; c < chunks; c++) {
        const int64_t slot = first_slot + c * group;
        if (chunk_sum[slot] == 0.f) continue;  // a chunk the mask hides
        const float weight = std::exp(chunk_max[slot] - maximum);
        total += chunk_sum[slot] * weight;
        for (int64_t x = 0; x < vecs; x++)
          out[x] = out[x] + Vec::loadu(chunk_out.data() + slot * dim + x * 16) * Vec(weight);
      }
      const Vec inverse(1.f / total);
      for (int64_t x = 0; x < vecs; x++) store_bfloat16(out[x] * inverse, out_data + row * dim + x * 16);
    }
  });
  return output;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("causal_attention", &causal_attention);
  m.def("decode_attention", &decode_attention);
}
