// Causal prefill attention for bfloat16 on CPUs with AVX512-BF16 (see cpu_kernels.fused_prefill_attention).
// Flash-style: per key head and block of query tokens, the logits of one key block at a time go through an online
// softmax in float32 and straight into the output accumulator, so the [tokens x keys] matrix is never written
// out. Both matrix products are oneDNN's bfloat16 batch-reduce GEMMs (at::native::cpublas::brgemm) on operands
// packed in VNNI layout (pairs along the reduction dimension interleaved), the layout its AVX512-BF16 kernels
// read at full speed.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("causal_attention", &causal_attention); }
