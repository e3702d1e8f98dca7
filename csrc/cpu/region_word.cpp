// CPU region-word similarity. Valid tokens are packed first, so the cost follows the real
// lengths; the packed regions x words product is formed tile by tile (a few hundred tokens
// a side) by the platform BLAS, the one routine that reaches this machine's GEMM ceiling,
// and each tile is reduced at once by the ALIGN / AGGREGATE epilogue, so the
// (Ni, Nt, R, L) tensor never exists. Tile pairs run in parallel, one BLAS thread each.
// The align-max backward is a gather of arg-max token rows (backward_max_side, row_gather.h).
// Block sizes come from the cache sizes the CPU reports (cpu_info.h), the gather's inner loop
// runs at the CPU's x86-64 level (AVX-512, AVX2 or the baseline).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../checks/region_word.h"
#include "../option_codes.h"
#include "cpu_info.h"
#include "row_gather.h"
#include "../ranking.h"  // takes_over: the inputs are finite, but a dot product can overflow

namespace fastalign {
namespace {

constexpr double kLeakySlope = 0.1;

// Valid region tokens per tile: rows enough for the BLAS to run at full speed.
constexpr int64_t kRowTile = 256;

// Valid word tokens per tile: at least 256, below which the BLAS slows down (a third slower at
// 128, measured), and more while a tile's gathered word rows (columns, dim) and its (kRowTile,
// columns) scores fit half of L2: the epilogue reduces the scores while they are in cache, and
// a thread's working memory stays about one L2.
int64_t column_tile(int64_t dim, int64_t element_bytes) {
  return items_fitting(l2_bytes() / 2, (dim + kRowTile) * element_bytes, 256, 2048);
}

struct Options {
  bool t2i, i2t, leaky;
  int64_t align, aggregate;
  double align_tau, aggregate_tau;
};

// Where the valid tokens of x (N, T, D) sit once packed: item n owns rows
// offset[n]..offset[n+1] of the (sum of lengths, D) matrix of valid tokens.
struct Tokens {
  at::Tensor x;
  std::vector<int64_t> offset;
};

Tokens make_tokens(const at::Tensor& x, const at::Tensor& lengths) {
  const int64_t* len = lengths.data_ptr<int64_t>();
  Tokens tokens{x, std::vector<int64_t>(x.size(0) + 1, 0)};
  for (int64_t n = 0; n < x.size(0); ++n) tokens.offset[n + 1] = tokens.offset[n] + len[n];
  return tokens;
}

// The valid tokens of items [n0, n1) as one (tokens, D) matrix: a view of x when none of
// them is padded, else a copy into `buffer` (grown as needed, reused across tiles).
at::Tensor gather_rows(const Tokens& tokens, int64_t n0, int64_t n1, at::Tensor& buffer) {
  const int64_t padded = tokens.x.size(1), dim = tokens.x.size(2);
  const int64_t rows = tokens.offset[n1] - tokens.offset[n0];
  if (rows == (n1 - n0) * padded) return tokens.x.view({-1, dim}).narrow(0, n0 * padded, rows);
  if (!buffer.defined() || buffer.size(0) < rows) buffer = at::empty({rows, dim}, tokens.x.options());
  const int64_t row_bytes = dim * tokens.x.element_size();
  char* dst = static_cast<char*>(buffer.data_ptr());
  const char* src = static_cast<const char*>(tokens.x.data_ptr());
  for (int64_t n = n0; n < n1; ++n)
    std::memcpy(dst + (tokens.offset[n] - tokens.offset[n0]) * row_bytes,
                src + n * padded * row_bytes, (tokens.offset[n + 1] - tokens.offset[n]) * row_bytes);
  return buffer.narrow(0, 0, rows);
}

// grad (N, T, D) rows of items [n0, n1) += rows, the packed (tokens, D) gradient.
void scatter_add_rows(const at::Tensor& rows, const Tokens& tokens, int64_t n0, int64_t n1,
                      at::Tensor& grad) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t len = tokens.offset[n + 1] - tokens.offset[n];
    grad[n].narrow(0, 0, len).add_(rows.narrow(0, tokens.offset[n] - tokens.offset[n0], len));
  }
}

// Boundaries of consecutive item groups holding at most `budget` valid tokens each
// (an item longer than the budget forms a group of its own).
std::vector<int64_t> group_by_tokens(const std::vector<int64_t>& offset, int64_t budget) {
  const int64_t n = static_cast<int64_t>(offset.size()) - 1;
  std::vector<int64_t> bounds{0};
  for (int64_t i = 0; i < n; ++i)
    if (i > bounds.back() && offset[i + 1] - offset[bounds.back()] > budget) bounds.push_back(i);
  bounds.push_back(n);
  return bounds;
}

template <typename acc_t>
inline acc_t activate(acc_t s, bool leaky) {
  return leaky && !(s > 0) ? s * static_cast<acc_t>(kLeakySlope) : s;
}

template <typename acc_t>
inline acc_t activation_slope(acc_t s, bool leaky) {
  return leaky && !(s > 0) ? static_cast<acc_t>(kLeakySlope) : acc_t(1);
}

// AGGREGATE of n aligned values a[0], a[stride], ...
template <typename acc_t>
acc_t aggregate_values(const acc_t* a, int64_t n, int64_t stride, const Options& o) {
  if (o.aggregate == Aggregate::kMean || o.aggregate == Aggregate::kSum) {
    acc_t total = 0;
    for (int64_t j = 0; j < n; ++j) total += a[j * stride];
    return o.aggregate == Aggregate::kMean ? total / static_cast<acc_t>(n) : total;
  }
  acc_t best = a[0];
  for (int64_t j = 1; j < n; ++j) best = takes_over(a[j * stride], best) ? a[j * stride] : best;
  if (o.aggregate == Aggregate::kMax) return best;
  const acc_t tau = static_cast<acc_t>(o.aggregate_tau);
  acc_t total = 0;
  for (int64_t j = 0; j < n; ++j) total += std::exp((a[j * stride] - best) / tau);
  return best + tau * std::log(total);
}

// Where the epilogue writes: scores (Ni, Nt) and, when a gradient is needed, the aligned
// value and arg-max key of every query token.
template <typename scalar_t>
struct ForwardOutputs {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* scores;
  acc_t* a_t2i;  // (Ni, Nt, L) or null
  int32_t* idx_t2i;
  acc_t* a_i2t;  // (Ni, Nt, R) or null
  int32_t* idx_i2t;
  int64_t n_captions, max_regions, max_words;
};

// Reduces one tile S = regions[images i0..i1) x words[captions t0..t1)^T (row-major, ld).
template <typename scalar_t>
void reduce_tile(const scalar_t* tile, int64_t ld, int64_t i0, int64_t i1, int64_t t0, int64_t t1,
                 const Tokens& images, const Tokens& captions, const Options& o,
                 const ForwardOutputs<scalar_t>& out, std::vector<at::opmath_type<scalar_t>>& best,
                 std::vector<int32_t>& arg, std::vector<at::opmath_type<scalar_t>>& total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row0 = images.offset[i0], col0 = captions.offset[t0];
  const int64_t n_cols = captions.offset[t1] - col0, n_caps = t1 - t0;
  const acc_t align_tau = static_cast<acc_t>(o.align_tau);
  std::vector<acc_t> row_aligned;  // i2t: aligned value of (region r, caption t)
  for (int64_t i = i0; i < i1; ++i) {
    const scalar_t* rows = tile + (images.offset[i] - row0) * ld;
    const int64_t n_rows = images.offset[i + 1] - images.offset[i];
    std::vector<acc_t> score(n_caps, acc_t(0));
    if (o.t2i) {  // every column (word): ALIGN over this image's rows (regions)
      acc_t* col_best = best.data();
      int32_t* col_arg = arg.data();
      for (int64_t c = 0; c < n_cols; ++c) {
        col_best[c] = rows[c];
        col_arg[c] = 0;
      }
      for (int64_t r = 1; r < n_rows; ++r) {
        const scalar_t* row = rows + r * ld;
        for (int64_t c = 0; c < n_cols; ++c) {
          // strict: ties keep the first region
          const bool better = takes_over(static_cast<acc_t>(row[c]), col_best[c]);
          col_best[c] = better ? static_cast<acc_t>(row[c]) : col_best[c];
          col_arg[c] = better ? static_cast<int32_t>(r) : col_arg[c];
        }
      }
      for (int64_t c = 0; c < n_cols; ++c) col_best[c] = activate(col_best[c], o.leaky);
      if (o.align == Align::kLse) {
        acc_t* col_total = total.data();
        std::fill(col_total, col_total + n_cols, acc_t(0));
        for (int64_t r = 0; r < n_rows; ++r) {
          const scalar_t* row = rows + r * ld;
          for (int64_t c = 0; c < n_cols; ++c)
            col_total[c] += std::exp((activate<acc_t>(row[c], o.leaky) - col_best[c]) / align_tau);
        }
        for (int64_t c = 0; c < n_cols; ++c)
          col_best[c] += align_tau * std::log(col_total[c]);
      }
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = captions.offset[t] - col0, n_words = captions.offset[t + 1] - col0 - c0;
        score[t - t0] += aggregate_values(col_best + c0, n_words, 1, o);
        const int64_t base = (i * out.n_captions + t) * out.max_words;
        if (out.a_t2i) std::copy(col_best + c0, col_best + c0 + n_words, out.a_t2i + base);
        if (out.idx_t2i) std::copy(col_arg + c0, col_arg + c0 + n_words, out.idx_t2i + base);
      }
    }
    if (o.i2t) {  // every row (region) and caption: ALIGN over the caption's columns
      row_aligned.resize(n_rows * n_caps);
      for (int64_t r = 0; r < n_rows; ++r) {
        const scalar_t* row = rows + r * ld;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t c0 = captions.offset[t] - col0, c1 = captions.offset[t + 1] - col0;
          int64_t c_best = c0;
          for (int64_t c = c0 + 1; c < c1; ++c)
            c_best = takes_over(row[c], row[c_best]) ? c : c_best;
          acc_t a = activate<acc_t>(row[c_best], o.leaky);
          if (o.align == Align::kLse) {
            acc_t sum = 0;
            for (int64_t c = c0; c < c1; ++c)
              sum += std::exp((activate<acc_t>(row[c], o.leaky) - a) / align_tau);
            a += align_tau * std::log(sum);
          }
          row_aligned[r * n_caps + (t - t0)] = a;
          const int64_t at = (i * out.n_captions + t) * out.max_regions + r;
          if (out.a_i2t) out.a_i2t[at] = a;
          if (out.idx_i2t) out.idx_i2t[at] = static_cast<int32_t>(c_best - c0);
        }
      }
      for (int64_t t = t0; t < t1; ++t)
        score[t - t0] += aggregate_values(row_aligned.data() + (t - t0), n_rows, n_caps, o);
    }
    for (int64_t t = t0; t < t1; ++t)
      out.scores[i * out.n_captions + t] = static_cast<scalar_t>(score[t - t0]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> region_word_forward_cpu(
    const at::Tensor& regions_in, const at::Tensor& words_in, const at::Tensor& region_lengths_in,
    const at::Tensor& word_lengths_in, int64_t direction, int64_t align, int64_t aggregate,
    double align_tau, double aggregate_tau, bool leaky, bool need_indices, bool need_values) {
  constexpr const char* op = "region_word_forward";
  const checks::RegionWordTokens in =
      checks::check_region_word_tokens(op, checks::Kernels::kCpu, regions_in, words_in,
                                       region_lengths_in, word_lengths_in);
  checks::check_region_word_forward_options(op, direction, align, aggregate, align_tau,
                                            aggregate_tau);
  const at::Tensor &regions = in.regions, &words = in.words;
  const at::Tensor &region_lengths = in.region_lengths, &word_lengths = in.word_lengths;
  checks::check_finite(op, "regions", regions, region_lengths.data_ptr<int64_t>());
  checks::check_finite(op, "words", words, word_lengths.data_ptr<int64_t>());
  const int64_t n_images = regions.size(0), max_regions = regions.size(1);
  const int64_t n_captions = words.size(0), max_words = words.size(1);
  const Options o{direction != Direction::kI2T, direction != Direction::kT2I, leaky, align,
                  aggregate, align_tau, aggregate_tau};
  const auto acc_options = regions.options().dtype(at::toOpMathType(regions.scalar_type()));
  const auto idx_options = regions.options().dtype(at::kInt);
  const bool keep_indices = need_indices && align == Align::kMax;
  auto aux = [&](bool used, int64_t tokens, const at::TensorOptions& options) {
    return used ? at::zeros({n_images, n_captions, tokens}, options) : at::empty({0}, options);
  };
  at::Tensor scores = at::empty({n_images, n_captions}, regions.options());
  at::Tensor a_t2i = aux(need_values && o.t2i, max_words, acc_options);
  at::Tensor idx_t2i = aux(keep_indices && o.t2i, max_words, idx_options);
  at::Tensor a_i2t = aux(need_values && o.i2t, max_regions, acc_options);
  at::Tensor idx_i2t = aux(keep_indices && o.i2t, max_regions, idx_options);

  const Tokens images = make_tokens(regions, region_lengths);
  const Tokens captions = make_tokens(words, word_lengths);
  const std::vector<int64_t> image_groups = group_by_tokens(images.offset, kRowTile);
  const std::vector<int64_t> caption_groups =
      group_by_tokens(captions.offset, column_tile(regions.size(2), regions.element_size()));

  AT_DISPATCH_FLOATING_TYPES(regions.scalar_type(), "region_word_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardOutputs<scalar_t> out{
        scores.data_ptr<scalar_t>(),
        a_t2i.numel() ? a_t2i.data_ptr<acc_t>() : nullptr,
        idx_t2i.numel() ? idx_t2i.data_ptr<int32_t>() : nullptr,
        a_i2t.numel() ? a_i2t.data_ptr<acc_t>() : nullptr,
        idx_i2t.numel() ? idx_i2t.data_ptr<int32_t>() : nullptr,
        n_captions, max_regions, max_words};
    // Caption groups go in waves, each group's words gathered once into a buffer that every
    // thread reads: a wave holds just enough groups for every thread to have a tile, so the
    // gathered words take a buffer or two, not one per thread. Image groups are gathered only
    // when they hold padding.
    const int64_t n_image_groups = static_cast<int64_t>(image_groups.size()) - 1;
    const int64_t n_caption_groups = static_cast<int64_t>(caption_groups.size()) - 1;
    const int64_t wave = std::min(
        n_caption_groups, ceil_div(at::get_num_threads(), std::max<int64_t>(1, n_image_groups)));
    std::vector<at::Tensor> word_buffers(wave), word_rows(wave);
    for (int64_t h0 = 0; h0 < n_caption_groups; h0 += wave) {
      const int64_t groups = std::min(wave, n_caption_groups - h0);
      for (int64_t w = 0; w < groups; ++w)
        word_rows[w] = gather_rows(captions, caption_groups[h0 + w], caption_groups[h0 + w + 1],
                                   word_buffers[w]);
      at::parallel_for(0, groups * n_image_groups, 1, [&](int64_t begin, int64_t end) {
        // The tiles' products are this kernel's own: below autograd on every thread (worker
        // threads do not inherit the caller's), though the inputs may require grad.
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        at::Tensor image_buffer, tile_buffer;
        std::vector<acc_t> best, total;
        std::vector<int32_t> arg;
        for (int64_t k = begin; k < end; ++k) {
          const int64_t w = k / n_image_groups, g = k % n_image_groups;
          const int64_t t0 = caption_groups[h0 + w], t1 = caption_groups[h0 + w + 1];
          const int64_t i0 = image_groups[g], i1 = image_groups[g + 1];
          const at::Tensor image_rows = gather_rows(images, i0, i1, image_buffer);
          const int64_t rows = image_rows.size(0), cols = word_rows[w].size(0);
          if (!tile_buffer.defined() || tile_buffer.numel() < rows * cols)
            tile_buffer = at::empty({rows * cols}, regions.options());
          at::Tensor tile = tile_buffer.narrow(0, 0, rows * cols).view({rows, cols});
          // Inside parallel_for the BLAS runs on this thread only.
          at::mm_out(tile, image_rows, word_rows[w].t());
          best.resize(cols);
          arg.resize(cols);
          total.resize(cols);
          reduce_tile<scalar_t>(tile.data_ptr<scalar_t>(), cols, i0, i1, t0, t1, images,
                                captions, o, out, best, arg, total);
        }
      });
    }
  });
  return {scores, a_t2i, idx_t2i, a_i2t, idx_i2t};
}

// dL/da of every query token, read through its strides: the mean / sum coefficients come
// as broadcast views (stride 0 along the tokens) and are never materialised. Padded tokens
// are never read.
template <typename acc_t>
struct Coefficients {
  const acc_t* data = nullptr;
  int64_t stride_image = 0, stride_caption = 0, stride_token = 0;
  explicit operator bool() const { return data != nullptr; }
  acc_t operator()(int64_t i, int64_t t, int64_t q) const {
    return data[i * stride_image + t * stride_caption + q * stride_token];
  }
};

template <typename acc_t>
Coefficients<acc_t> coefficients(const at::Tensor& coef) {
  if (coef.numel() == 0) return {};
  return {coef.data_ptr<acc_t>(), coef.stride(0), coef.stride(1), coef.stride(2)};
}

// One side of the align-max backward (regions or words): its tokens (items, padded, dim), valid
// lengths and float accumulation gradient.
template <typename scalar_t, typename acc_t>
struct MaxSide {
  const scalar_t* tokens;
  const int64_t* lengths;
  int64_t items, padded;
  acc_t* grad;
};

// One direction's dL/da and arg-max key tokens, both indexed by (image, caption, query token).
template <typename acc_t>
struct MaxDirection {
  Coefficients<acc_t> coef;
  const int32_t* index;
};

// Entries of one item chunk's RowSums at most (512 KiB in float32): the chunk's items share each
// packed slice of the other side's tokens, so larger chunks pack it fewer times.
constexpr int64_t kChunkEntries = 1 << 16;

// One side's tokens as the other side's gradient gathers them: valid token v of item x sits at
// row x * padded + v - offset[x] of tokens (items, padded, dim).
template <typename scalar_t>
struct GatherSource {
  const scalar_t* tokens;
  std::vector<int64_t> offset;
  int64_t padded;
};

// out rows [0, rows) (row-major, dim columns) = sums, every row written (rows without entries
// as zeros), a block of columns at a time (row_gather.h), the sources numbered as packed.
template <typename scalar_t>
void sum_rows(const RowSums<scalar_t>& sums, const GatherSource<scalar_t>& other, int64_t dim,
              std::vector<scalar_t>& packed, scalar_t* out) {
  const int64_t rows = static_cast<int64_t>(sums.start.size()) - 1;
  const int64_t items = static_cast<int64_t>(other.offset.size()) - 1;
  const int64_t width = gather_width(other.offset.back(), 1, sizeof(scalar_t));
  const Isa isa = cpu_isa();
  scalar_t* const outs[1] = {out};
  packed.resize(other.offset.back() * width);
  for_each_column_block(dim, width, [&](int64_t d0, auto block_width) {
    constexpr int64_t kWidth = decltype(block_width)::value;
    for (int64_t x = 0; x < items; ++x)
      for (int64_t v = other.offset[x]; v < other.offset[x + 1]; ++v)
        std::copy_n(other.tokens + (x * other.padded + v - other.offset[x]) * dim + d0, kWidth,
                    packed.data() + v * kWidth);
    sum_rows_block<kWidth, 1>(isa, sums.start.data(), sums.source.data(), sums.weight.data(), 0,
                              rows, packed.data(), outs, dim, d0);
  });
}

// The gradient of own's tokens. As the queries of as_query, own's tokens gather c * their
// arg-max key of every other item; as the keys of as_key, they receive c * every query token of
// other that picked them. Both become one RowSums per chunk of own's items, summed block of
// columns by block of columns (sum_rows); chunks run in parallel and write only their own rows.
template <typename scalar_t, typename acc_t>
void backward_max_side(const MaxSide<scalar_t, acc_t>& own, const MaxSide<scalar_t, acc_t>& other,
                       bool own_is_image, const MaxDirection<acc_t>& as_query,
                       const MaxDirection<acc_t>& as_key, int64_t dim) {
  // Float and double only (AT_DISPATCH_FLOATING_TYPES): each its own accumulation type.
  static_assert(std::is_same_v<scalar_t, acc_t>);
  const int64_t n_captions = own_is_image ? other.items : own.items;
  // (image, caption) of own item o and other item x, flattened, and the coefficient of a token.
  auto pair = [&](int64_t o, int64_t x) {
    return own_is_image ? o * n_captions + x : x * n_captions + o;
  };
  auto coef = [&](const Coefficients<acc_t>& c, int64_t o, int64_t x, int64_t token) {
    return own_is_image ? c(o, x, token) : c(x, o, token);
  };
  GatherSource<scalar_t> source{other.tokens, std::vector<int64_t>(other.items + 1, 0),
                                other.padded};
  std::partial_sum(other.lengths, other.lengths + other.items, source.offset.begin() + 1);
  TORCH_CHECK_VALUE(source.offset.back() <= std::numeric_limits<int32_t>::max(),
                    "region_word_backward: align max takes at most 2^31 - 1 valid tokens a side, "
                    "got ", source.offset.back());
  const std::vector<int64_t>& offset = source.offset;
  // Calls visit(row, source, weight) for every nonzero term of items [o0, o1).
  auto for_each_term = [&](int64_t o0, int64_t o1, auto&& visit) {
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t base = (o - o0) * own.padded;
      for (int64_t x = 0; x < other.items; ++x) {
        const int64_t p = pair(o, x);
        for (int64_t q = 0; as_query.coef && q < own.lengths[o]; ++q) {
          const acc_t c = coef(as_query.coef, o, x, q);
          if (c != 0) visit(base + q, offset[x] + as_query.index[p * own.padded + q], c);
        }
        for (int64_t q = 0; as_key.coef && q < other.lengths[x]; ++q) {
          const acc_t c = coef(as_key.coef, o, x, q);
          if (c != 0) visit(base + as_key.index[p * other.padded + q], offset[x] + q, c);
        }
      }
    }
  };
  // Chunks of consecutive items, a multiple of the thread count of them, each with about the
  // same number of terms and no more than kChunkEntries (plus one item's).
  auto item_terms = [&](int64_t o) {
    return (as_query.coef ? own.lengths[o] * other.items : 0) + (as_key.coef ? offset.back() : 0);
  };
  int64_t all_terms = 0;
  for (int64_t o = 0; o < own.items; ++o) all_terms += item_terms(o);
  const int64_t threads = at::get_num_threads();
  const int64_t n_chunks =
      threads * std::max<int64_t>(1, ceil_div(all_terms, threads * kChunkEntries));
  const int64_t target = std::max<int64_t>(1, ceil_div(all_terms, n_chunks));
  std::vector<int64_t> chunks{0};
  int64_t terms = 0;
  for (int64_t o = 0; o + 1 < own.items; ++o) {
    terms += item_terms(o);
    if (terms >= target) {
      chunks.push_back(o + 1);
      terms = 0;
    }
  }
  chunks.push_back(own.items);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    RowSums<acc_t> sums;
    std::vector<int64_t> next;
    std::vector<scalar_t> packed;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t o0 = chunks[k], o1 = chunks[k + 1];
      sums.start.assign((o1 - o0) * own.padded + 1, 0);
      for_each_term(o0, o1, [&](int64_t row, int64_t, acc_t) { ++sums.start[row + 1]; });
      std::partial_sum(sums.start.begin(), sums.start.end(), sums.start.begin());
      sums.source.resize(sums.start.back());
      sums.weight.resize(sums.start.back());
      next.assign(sums.start.begin(), sums.start.end() - 1);
      for_each_term(o0, o1, [&](int64_t row, int64_t source, acc_t weight) {
        const int64_t j = next[row]++;
        sums.source[j] = static_cast<int32_t>(source);
        sums.weight[j] = weight;
      });
      sum_rows(sums, source, dim, packed, own.grad + o0 * own.padded * dim);
    }
  });
}

// Align max: every query token's gradient goes to its one arg-max key, so the backward is
// a gather-accumulate over (image, caption, token) triples: words first (queries of t2i, keys
// of i2t), then regions (the reverse roles). Every element of both gradients is written.
template <typename scalar_t>
void backward_max(const at::Tensor& coef_t2i, const at::Tensor& idx_t2i, const at::Tensor& coef_i2t,
                  const at::Tensor& idx_i2t, const at::Tensor& regions, const at::Tensor& words,
                  const int64_t* region_len, const int64_t* word_len, at::Tensor& grad_regions,
                  at::Tensor& grad_words) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto c_t2i = coefficients<acc_t>(coef_t2i), c_i2t = coefficients<acc_t>(coef_i2t);
  const MaxDirection<acc_t> t2i{c_t2i, c_t2i ? idx_t2i.data_ptr<int32_t>() : nullptr};
  const MaxDirection<acc_t> i2t{c_i2t, c_i2t ? idx_i2t.data_ptr<int32_t>() : nullptr};
  const MaxSide<scalar_t, acc_t> images{regions.data_ptr<scalar_t>(), region_len, regions.size(0),
                                        regions.size(1), grad_regions.data_ptr<acc_t>()};
  const MaxSide<scalar_t, acc_t> captions{words.data_ptr<scalar_t>(), word_len, words.size(0),
                                          words.size(1), grad_words.data_ptr<acc_t>()};
  backward_max_side(captions, images, false, t2i, i2t, regions.size(2));
  backward_max_side(images, captions, true, i2t, t2i, regions.size(2));
}

// Align lse: every key token takes part, so each tile of scores is recomputed, turned in
// place into dL/ds, and multiplied back: grad_regions += G words, grad_words += G^T regions.
// Image groups run in parallel; each thread accumulates its own grad_words partial.
template <typename scalar_t>
void backward_lse(const at::Tensor& coef_t2i, const at::Tensor& a_t2i, const at::Tensor& coef_i2t,
                  const at::Tensor& a_i2t, const at::Tensor& regions, const at::Tensor& words,
                  const at::Tensor& region_lengths, const at::Tensor& word_lengths,
                  double align_tau, bool leaky, at::Tensor& grad_regions, at::Tensor& grad_words) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_captions = words.size(0), max_regions = regions.size(1),
                max_words = words.size(1);
  const Tokens images = make_tokens(regions, region_lengths);
  const Tokens captions = make_tokens(words, word_lengths);
  const std::vector<int64_t> image_groups = group_by_tokens(images.offset, kRowTile);
  const std::vector<int64_t> caption_groups =
      group_by_tokens(captions.offset, column_tile(regions.size(2), regions.element_size()));
  const auto c_t2i = coefficients<acc_t>(coef_t2i), c_i2t = coefficients<acc_t>(coef_i2t);
  const acc_t* v_t2i = c_t2i ? a_t2i.data_ptr<acc_t>() : nullptr;
  const acc_t* v_i2t = c_i2t ? a_i2t.data_ptr<acc_t>() : nullptr;
  const acc_t tau = static_cast<acc_t>(align_tau);

  at::Tensor grad_word_partials = at::zeros({at::get_num_threads(), n_captions, max_words,
                                             words.size(2)}, grad_words.options());
  at::parallel_for(0, static_cast<int64_t>(image_groups.size()) - 1, 1, [&](int64_t begin,
                                                                            int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in the forward's tiles
    at::Tensor grad_word_partial = grad_word_partials[at::get_thread_num()];
    at::Tensor image_buffer, word_buffer;
    for (int64_t g = begin; g < end; ++g) {
      const int64_t i0 = image_groups[g], i1 = image_groups[g + 1];
      const int64_t row0 = images.offset[i0];
      const at::Tensor image_rows = gather_rows(images, i0, i1, image_buffer);
      at::Tensor grad_image_rows = at::zeros_like(image_rows);
      for (size_t h = 0; h + 1 < caption_groups.size(); ++h) {
        const int64_t t0 = caption_groups[h], t1 = caption_groups[h + 1];
        const int64_t col0 = captions.offset[t0];
        const at::Tensor word_rows = gather_rows(captions, t0, t1, word_buffer);
        const int64_t n_cols = word_rows.size(0);
        at::Tensor tile = at::mm(image_rows, word_rows.t());
        scalar_t* s = tile.data_ptr<scalar_t>();
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t r = 0; r < images.offset[i + 1] - images.offset[i]; ++r) {
            scalar_t* row = s + (images.offset[i] - row0 + r) * n_cols;
            for (int64_t t = t0; t < t1; ++t) {
              const int64_t c0 = captions.offset[t] - col0, n = captions.offset[t + 1] - col0 - c0;
              const int64_t pair = i * n_captions + t;
              for (int64_t w = 0; w < n; ++w) {
                const acc_t raw = row[c0 + w], act = activate(raw, leaky);
                acc_t g_s = 0;
                if (c_t2i)
                  g_s += c_t2i(i, t, w) * std::exp((act - v_t2i[pair * max_words + w]) / tau);
                if (c_i2t)
                  g_s += c_i2t(i, t, r) * std::exp((act - v_i2t[pair * max_regions + r]) / tau);
                row[c0 + w] = static_cast<scalar_t>(g_s * activation_slope(raw, leaky));
              }
            }
          }
        grad_image_rows.addmm_(tile, word_rows);
        scatter_add_rows(at::mm(tile.t(), image_rows), captions, t0, t1, grad_word_partial);
      }
      scatter_add_rows(grad_image_rows, images, i0, i1, grad_regions);
    }
  });
  grad_words.copy_(grad_word_partials.sum(0));
}

std::tuple<at::Tensor, at::Tensor> region_word_backward_cpu(
    const at::Tensor& coef_t2i_in, const at::Tensor& aux_t2i_in, const at::Tensor& coef_i2t_in,
    const at::Tensor& aux_i2t_in, const at::Tensor& regions_in, const at::Tensor& words_in,
    const at::Tensor& region_lengths_in, const at::Tensor& word_lengths_in, int64_t align,
    double align_tau, bool leaky) {
  constexpr const char* op = "region_word_backward";
  const checks::RegionWordTokens in =
      checks::check_region_word_tokens(op, checks::Kernels::kCpu, regions_in, words_in,
                                       region_lengths_in, word_lengths_in);
  checks::check_option<Align>(op, "align", align);
  checks::check_number(op, "align_tau", align_tau, 0.0, false);
  const at::Tensor &regions = in.regions, &words = in.words;
  const at::Tensor &region_lengths = in.region_lengths, &word_lengths = in.word_lengths;
  checks::check_finite(op, "regions", regions, region_lengths.data_ptr<int64_t>());
  checks::check_finite(op, "words", words, word_lengths.data_ptr<int64_t>());
  const at::Tensor& coef_t2i = coef_t2i_in;  // read through strides: see Coefficients
  const at::Tensor& coef_i2t = coef_i2t_in;
  const at::Tensor aux_t2i = checks::check_region_word_saved(op, "coef_t2i", coef_t2i, "aux_t2i",
                                                             aux_t2i_in, in, true, align);
  const at::Tensor aux_i2t = checks::check_region_word_saved(op, "coef_i2t", coef_i2t, "aux_i2t",
                                                             aux_i2t_in, in, false, align);
  const auto acc_options = regions.options().dtype(at::toOpMathType(regions.scalar_type()));
  // The max backward writes every element; the lse backward accumulates.
  auto gradient = [&](const at::Tensor& x) {
    return align == Align::kMax ? at::empty(x.sizes(), acc_options)
                                : at::zeros(x.sizes(), acc_options);
  };
  at::Tensor grad_regions = gradient(regions), grad_words = gradient(words);
  AT_DISPATCH_FLOATING_TYPES(regions.scalar_type(), "region_word_backward_cpu", [&] {
    if (align == Align::kMax) {
      backward_max<scalar_t>(coef_t2i, aux_t2i, coef_i2t, aux_i2t, regions, words,
                             region_lengths.data_ptr<int64_t>(), word_lengths.data_ptr<int64_t>(),
                             grad_regions, grad_words);
    } else {
      backward_lse<scalar_t>(coef_t2i, aux_t2i, coef_i2t, aux_i2t, regions, words, region_lengths,
                             word_lengths, align_tau, leaky, grad_regions, grad_words);
    }
  });
  return {grad_regions.to(regions.scalar_type()), grad_words.to(words.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastalign, CPU, m) {
  m.impl("region_word_forward", &region_word_forward_cpu);
  m.impl("region_word_backward", &region_word_backward_cpu);
}

}  // namespace fastalign
