// The level loop of tnkd.tn.fused.FastTree (a binary tree of pair steps) as native loops: the
// forward step and hand-written backward of tnkd/tn/fused.py's module docstring. Level k joins
// G nodes W[g, a, b, p] with their two children, each a row (A, n) of a block or of an earlier
// level's result (named per node: slot and row), optionally divided per (node, sample) by its
// max-abs over p (clamped at the smallest normal float; the divisors are returned, their logs
// sum to the root's log-scale).
//
// Threads never meet between levels (see Split). Inside a thread, a node's columns go in chunks
// of at most 4 SIMD registers, with the chunk's outer product left (x) right in an L1-sized
// scratch: the forward product is a register-tiled matrix product along the columns, g_W a
// product with the batch as the reduction (the gradient transposed, so no horizontal sums). The
// optional head (logits exp(s) v / ||v|| of the root v, and its backward) is computed here too.
//
// With `linear`, level 0's left child is a (G, 2, n) tensor of raw pairs [x_l, x_r] (any
// strides), and its children are the [1, x] features [1, x_l] and [1, x_r] (A = B = 2), made
// on the fly; the raw pairs get no gradient.

#include <torch/extension.h>

#include "simd.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using namespace tnkd_simd;

// out (rows, nv*L) = A (rows, depth) @ x (depth, nv*L), both scratch with row stride ld.
template <typename T>
void matmul(const T* a, int64_t ar, int64_t ak, int64_t rows, int64_t depth, const T* x,
            int64_t nv, int64_t ld, T* out) {
  constexpr int64_t L = Vec<T>::lanes;
  const Strides st{ar, 0, ak};
  switch (nv) {
    case 1: mm_rows<T, 6, 1>(a, st, 1, depth, rows, x, ld, out, ld, 0, L); break;
    case 2: mm_rows<T, 6, 2>(a, st, 1, depth, rows, x, ld, out, ld, 0, 2 * L); break;
    case 3: mm_rows<T, 4, 3>(a, st, 1, depth, rows, x, ld, out, ld, 0, 3 * L); break;
    default: mm_rows<T, 4, 4>(a, st, 1, depth, rows, x, ld, out, ld, 0, 4 * L); break;
  }
}

// A child: element (node, row, column) at ptr[node*sn + row*sr + column*sc].
template <typename T>
struct Child {
  T* ptr;
  int64_t sn, sr, sc;
};

// d[0..cols) = s[0..cols): whole registers copied as such (a memcpy call per short row cost
// more), then the rest one by one.
template <typename T>
inline void copy_row(const T* s, int64_t cols, T* d) {
  constexpr int64_t L = Vec<T>::lanes;
  int64_t c = 0;
  for (; c + L <= cols; c += L) store(d + c, load(s + c));
  for (; c < cols; ++c) d[c] = s[c];
}

// dst[r][0..width) = src rows r (columns c0..c0+cols), zero from cols on (width: whole registers).
template <typename T>
inline void load_rows(const T* src, int64_t sr, int64_t sc, int64_t rows, int64_t cols,
                      int64_t width, T* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * sr;
    T* d = dst + r * width;
    if (sc == 1) {
      copy_row(s, cols, d);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = s[c * sc];
    }
    for (int64_t q = cols; q < width; ++q) d[q] = 0;
  }
}

// Rows (rows, width) of scratch into columns c0..c0+cols of `dst` (a result or a gradient,
// contiguous along the batch): written, or added to with `add`.
template <typename T>
inline void give(const T* src, int64_t rows, int64_t width, int64_t cols, const Child<T>& dst,
                 int64_t c0, bool add) {
  for (int64_t r = 0; r < rows; ++r) {
    T* d = dst.ptr + r * dst.sr + c0;
    if (!add) {
      copy_row(src + r * width, cols, d);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = d[c] + src[r * width + c];
    }
  }
}

// o[(a, b)][:] = l[a][:] r[b][:] over `nv` registers.
template <typename T>
inline void outer(const T* l, int64_t A, const T* r, int64_t B, int64_t nv, int64_t width, T* o) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  for (int64_t a = 0; a < A; ++a)
    for (int64_t n = 0; n < nv; ++n) {
      const V lv = load(l + a * width + n * L);
      for (int64_t b = 0; b < B; ++b)
        store(o + (a * B + b) * width + n * L, lv * load(r + b * width + n * L));
    }
}

// One register of rows 0..P-1 (row stride `width`) divided by d.
template <typename T>
inline void divide(T* rows, int64_t P, int64_t width, typename Vec<T>::type d) {
  for (int64_t p = 0; p < P; ++p) store(rows + p * width, load(rows + p * width) / d);
}

// A child's gradient over `nv` registers: the left's (side 0) g[a] = sum_b gO[(a, b)] right[b],
// the right's (side 1) g[b] = sum_a gO[(a, b)] left[a]; `other` is the other child.
template <typename T>
inline void child_grad(const T* go, int64_t A, int64_t B, int side, const T* other, int64_t nv,
                       int64_t width, T* g) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  const int64_t rows = side ? B : A, terms = side ? A : B;
  const int64_t s_row = side ? 1 : B, s_term = side ? B : 1;  // gO's rows (a, b) strides
  for (int64_t v = 0; v < nv; ++v)
    for (int64_t i = 0; i < rows; ++i) {
      V acc = V{};
      for (int64_t j = 0; j < terms; ++j)
        acc += load(go + (i * s_row + j * s_term) * width + v * L) *
               load(other + j * width + v * L);
      store(g + i * width + v * L, acc);
    }
}

struct Level {
  int64_t w;
  bool renorm;
  int64_t nodes, A, B, P;
  int64_t first;  // where its nodes' children start in the plan's lists
  int64_t divisors = -1;  // its first row of divisors (-1: not renormalised)
  bool need_children = false;  // (backward) some child's gradient is needed
  int64_t rows(int side) const { return side ? B : A; }
};

// Node i's children: left (side 0) and right (side 1), each at row row[side][i] of slot
// slot[side][i]; a slot is a block, or (from `blocks` on) an earlier level's result.
struct Plan {
  std::vector<Level> levels;
  std::vector<int64_t> slot[2], row[2];
  int64_t blocks, n, divisors = 0;
  bool linear;
  int64_t max_ab = 1, max_a = 1, max_p = 1;
};

// The plan of `lists` (the weights' slots, then the left and right children's slots and rows)
// for the blocks, which it checks, the weights made contiguous.
Plan make_plan(std::vector<at::Tensor>& blocks, std::vector<std::vector<int64_t>> lists,
               const std::vector<bool>& renorm, bool linear) {
  Plan plan;
  plan.blocks = blocks.size();
  plan.linear = linear;
  TORCH_CHECK(lists.size() == 5 && !lists[0].empty() && lists[0].size() == renorm.size(),
              "tree_levels: the plan's lists must have one entry per level");
  const std::vector<int64_t>& w = lists[0];
  const int64_t K = w.size(), total = lists[1].size();
  for (int s = 0; s < 2; ++s) {
    plan.slot[s] = std::move(lists[1 + 2 * s]);
    plan.row[s] = std::move(lists[2 + 2 * s]);
    TORCH_CHECK((int64_t)plan.slot[s].size() == total && (int64_t)plan.row[s].size() == total,
                "tree_levels: the children's lists must have one entry per node");
  }
  const int64_t leaf = total > 0 ? plan.slot[0][0] : -1;
  TORCH_CHECK(leaf >= 0 && leaf < plan.blocks && blocks[leaf].dim() == 3,
              "tree_levels: the first level's children must be (G, A, n) blocks");
  plan.n = blocks[leaf].size(2);
  for (auto& b : blocks) {
    TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == blocks[0].scalar_type(),
                "tree_levels: blocks must be on the CPU, of one dtype");
    TORCH_CHECK(b.dim() != 3 || b.size(2) == plan.n, "tree_levels: every input's batch must be ",
                plan.n, ", got ", b.size(2));
    if (b.dim() == 4) b = b.contiguous();
  }
  // a slot's (nodes, rows): a (G, X, n) block or an earlier level's (G, P, n) result
  auto shape = [&](int64_t slot) -> std::pair<int64_t, int64_t> {
    if (slot >= plan.blocks) {
      const Level& below = plan.levels[slot - plan.blocks];
      return {below.nodes, below.P};
    }
    const at::Tensor& b = blocks[slot];
    TORCH_CHECK(b.dim() == 3, "tree_levels: a child block must be (G, A, n), got ", b.dim(),
                " dimensions");
    return {b.size(0), b.size(1)};
  };
  int64_t first = 0;
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(w[k] >= 0 && w[k] < plan.blocks && blocks[w[k]].dim() == 4,
                "tree_levels: a level's weights must be a (G, A, B, P) block");
    const at::Tensor& wt = blocks[w[k]];
    Level lv{w[k], renorm[k], wt.size(0), wt.size(1), wt.size(2), wt.size(3), first};
    TORCH_CHECK(first + lv.nodes <= total, "tree_levels: level ", k, " has no children listed");
    for (int64_t i = first; i < first + lv.nodes; ++i) {
      for (int s = 0; s < 2; ++s) {
        const int64_t slot = plan.slot[s][i], row = plan.row[s][i];
        TORCH_CHECK(slot >= 0 && slot < plan.blocks + k,
                    "tree_levels: a level reads a block or an earlier level's result");
        const auto [sn, sr] = shape(slot);
        const int64_t want = linear && k == 0 ? 2 : lv.rows(s);
        TORCH_CHECK(row >= 0 && row < sn && sr == want, "tree_levels: level ", k,
                    " expects children of ", want, " rows, got a (", sn, ", ", sr,
                    ", n) slot (row ", row, ")");
      }
    }
    TORCH_CHECK(!(linear && k == 0) || (lv.A == 2 && lv.B == 2),
                "tree_levels: [1, x] leaves need (G, 2, 2, P) weights and (G, 2, n) pairs");
    first += lv.nodes;
    if (lv.renorm) {
      lv.divisors = plan.divisors;
      plan.divisors += lv.nodes;
    }
    plan.max_ab = std::max(plan.max_ab, lv.A * lv.B);
    plan.max_a = std::max({plan.max_a, lv.A, lv.B});
    plan.max_p = std::max(plan.max_p, lv.P);
    plan.levels.push_back(lv);
  }
  TORCH_CHECK(first == total, "tree_levels: ", total, " children listed for ", first, " nodes");
  return plan;
}

// How a pass is split between threads. By subtrees where the levels form a chain (the leaves read
// row g of two blocks, each level rows 2g and 2g + 1 of the one below, each level its own weights:
// node g of level k depends only on nodes g 2^(k-j) .. (g+1) 2^(k-j) - 1 of level j <= k): task t
// runs levels 0..top-1 on its own subtrees, all columns, with no synchronisation and no shared
// weight gradients; the levels from `top` (fewer nodes than threads: the root, ...) run on one
// thread after them (before them, backward). Otherwise by columns: task t runs every level on its
// own columns of the batch, each task with its own weight-gradient buffer, summed at the end.
struct Split {
  bool subtrees;
  int64_t tasks, top;
};

template <typename T>
Split split_work(const Plan& plan) {
  const int64_t K = plan.levels.size(), threads = at::get_num_threads();
  bool chain = true;
  for (int64_t k = 0; k < K && chain; ++k) {
    const Level& lv = plan.levels[k];
    chain = k == 0 || (2 * lv.nodes == plan.levels[k - 1].nodes && lv.w != plan.levels[0].w);
    for (int64_t j = 1; j < k && chain; ++j) chain = lv.w != plan.levels[j].w;
    for (int64_t g = 0; g < lv.nodes && chain; ++g) {
      const int64_t i = lv.first + g, below = plan.blocks + k - 1;
      for (int s = 0; s < 2; ++s) {
        const int64_t slot = plan.slot[s][i], row = plan.row[s][i];
        chain = chain && (k == 0 ? slot == plan.slot[s][0] && slot < plan.blocks && row == g
                                 : slot == below && row == 2 * g + s);
      }
    }
  }
  if (threads > 1 && chain) {
    int64_t top = 0;
    while (top < K && plan.levels[top].nodes >= threads) ++top;
    if (top > 0) return {true, threads, top};
  }
  const int64_t regs = padded_width<T>(plan.n) / Vec<T>::lanes;
  return {false, std::max<int64_t>(1, std::min<int64_t>(threads, regs)), K};
}

// The nodes of level k that task t runs: its subtrees' below split.top, else all.
inline std::pair<int64_t, int64_t> task_nodes(const Plan& plan, const Split& split, int64_t t,
                                              int64_t k) {
  if (!split.subtrees || k >= split.top) return {0, plan.levels[k].nodes};
  const int64_t G = plan.levels[split.top - 1].nodes;
  const int64_t f = plan.levels[k].nodes / G;  // 2^(top - 1 - k)
  return {t * G / split.tasks * f, (t + 1) * G / split.tasks * f};
}

// Registers per chunk: the outer product (A*B rows) within about 32 KB, at most 4.
int64_t chunk_registers(int64_t max_ab) {
  const int64_t fit = (32 * 1024) / (max_ab * 64);
  return std::max<int64_t>(1, std::min<int64_t>(4, fit));
}

// The children of node g at level k in `slots` (the values', or the gradients').
template <typename T>
std::array<Child<T>, 2> children(const Plan& plan, const Level& lv, int64_t g,
                                 const std::vector<Child<T>>& slots) {
  std::array<Child<T>, 2> out;
  for (int s = 0; s < 2; ++s) {
    out[s] = slots[plan.slot[s][lv.first + g]];
    out[s].ptr += plan.row[s][lv.first + g] * out[s].sn;
  }
  return out;
}

// The slots of the tensors of `a`, then of `b`: (G, X, n) tensors as children, others none.
template <typename T>
std::vector<Child<T>> as_slots(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  std::vector<Child<T>> slots;
  for (const std::vector<at::Tensor>* list : {&a, &b})
    for (const at::Tensor& t : *list)
      slots.push_back(t.defined() && t.dim() == 3
                          ? Child<T>{t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)}
                          : Child<T>{nullptr, 0, 0, 0});
  return slots;
}

// Level k's children of node g for columns c0..c0+cols into dst[0] (A rows), dst[1] (B rows).
template <typename T>
inline void load_children(const Plan& plan, int64_t k, const Level& lv,
                          const std::array<Child<T>, 2>& ch, int64_t c0, int64_t cols,
                          int64_t width, T* const* dst) {
  for (int s = 0; s < 2; ++s) {
    if (plan.linear && k == 0) {  // [1, x_l] and [1, x_r] from the raw pair of node g
      for (int64_t c = 0; c < width; ++c) dst[s][c] = c < cols ? T(1) : T(0);
      const T* x = ch[0].ptr + c0 * ch[0].sc + s * ch[0].sr;
      load_rows(x, ch[0].sr, ch[0].sc, 1, cols, width, dst[s] + width);
    } else {
      load_rows(ch[s].ptr + c0 * ch[s].sc, ch[s].sr, ch[s].sc, lv.rows(s), cols, width, dst[s]);
    }
  }
}

// A thread's scratch: 64-byte aligned rows of `width`, not initialised.
template <typename T>
struct Work {
  std::unique_ptr<T[]> data;
  T *child[2], *grad, *o, *go, *p, *gt, *dv;
  Work(const Plan& plan, int64_t width, int64_t pad_p)
      : data(new T[width * (3 * plan.max_a + 2 * plan.max_ab + plan.max_p + pad_p + 1) +
                   64 / sizeof(T)]) {
    T* next = reinterpret_cast<T*>((reinterpret_cast<std::uintptr_t>(data.get()) + 63) / 64 * 64);
    auto take = [&](int64_t rows) { return std::exchange(next, next + rows * width); };
    child[0] = take(plan.max_a), child[1] = take(plan.max_a), grad = take(plan.max_a);
    o = take(plan.max_ab), go = take(plan.max_ab), p = take(plan.max_p);
    gt = take(pad_p), dv = take(1);
  }
};

// Runs a pass as `split` says: levels(t, k0, k1, cbegin, cend, work) runs levels k0..k1-1 of
// task t (the task after the last: the levels from split.top) on columns cbegin..cend (whole
// registers, split as evenly as they go), and head(t, cbegin, cend) the head: after the levels
// forward, before them `backward`.
template <typename T, typename Levels, typename Head>
void run_split(const Plan& plan, const Split& split, bool backward, int64_t width, int64_t pad_p,
               Levels&& levels, Head&& head) {
  constexpr int64_t L = Vec<T>::lanes;
  const int64_t K = plan.levels.size(), n = plan.n, regs = padded_width<T>(n) / L;
  auto tasks = [&](int64_t k1) {
    at::parallel_for(0, split.tasks, 1, [&](int64_t t0, int64_t t1) {
      Work<T> work(plan, width, pad_p);
      for (int64_t t = t0; t < t1; ++t) {
        if (split.subtrees) {
          levels(t, 0, k1, 0, n, work);
          continue;
        }
        const int64_t cbegin = std::min(n, t * regs / split.tasks * L);
        const int64_t cend = std::min(n, (t + 1) * regs / split.tasks * L);
        if (backward) head(t, cbegin, cend);
        levels(t, 0, k1, cbegin, cend, work);
        if (!backward) head(t, cbegin, cend);
      }
    });
  };
  if (!split.subtrees) return tasks(K);
  Work<T> work(plan, width, pad_p);
  if (!backward) tasks(split.top);
  if (backward) head(0, 0, n);
  levels(split.tasks, split.top, K, 0, n, work);
  if (!backward) head(0, 0, n);
  if (backward) tasks(split.top);
}

using Forward = std::tuple<std::vector<at::Tensor>, at::Tensor, bool, at::Tensor, at::Tensor>;

template <typename T>
Forward forward_impl(const std::vector<at::Tensor>& blocks, const Plan& plan, bool square,
                     bool head, double log_scale, double lowest, double highest) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  const int64_t n = plan.n, K = plan.levels.size();
  const auto options = blocks[plan.levels[0].w].options();
  std::vector<at::Tensor> outs;
  for (const auto& lv : plan.levels) outs.push_back(at::empty({lv.nodes, lv.P, n}, options));
  const std::vector<Child<T>> slots = as_slots<T>(blocks, outs);
  const int64_t square_row = plan.divisors;
  at::Tensor divisors = at::empty({plan.divisors + (square ? 1 : 0), 1, n}, options);
  T* div = divisors.data_ptr<T>();
  const int64_t width = chunk_registers(plan.max_ab) * L;
  // the head: logits (n, C) = exp(s) v / ||v|| of the root v, and 1 / ||v|| per sample
  const T scale = std::exp(static_cast<T>(log_scale));
  const int64_t classes = plan.levels.back().P;
  at::Tensor logits = head ? at::empty({n, classes}, options) : at::Tensor();
  at::Tensor inverse = head ? at::empty({n}, options) : at::Tensor();
  const Split split = split_work<T>(plan);

  auto levels = [&](int64_t t, int64_t k0, int64_t k1, int64_t cbegin, int64_t cend, Work<T>& w) {
    for (int64_t k = k0; k < k1; ++k) {
      const Level& lv = plan.levels[k];
      const T* weight = blocks[lv.w].data_ptr<T>();
      const Child<T> dst = slots[plan.blocks + k];
      const int64_t abp = lv.A * lv.B * lv.P;
      const auto [g0, g1] = task_nodes(plan, split, t, k);
      for (int64_t g = g0; g < g1; ++g) {
        const auto ch = children<T>(plan, lv, g, slots);
        for (int64_t c0 = cbegin; c0 < cend; c0 += width) {
          const int64_t cols = std::min(width, cend - c0);
          const int64_t nv = padded_width<T>(cols) / L;
          T* out = w.p;
          load_children(plan, k, lv, ch, c0, cols, width, w.child);
          outer(w.child[0], lv.A, w.child[1], lv.B, nv, width, w.o);
          // out[p][:] = sum_{ab} W[ab][p] o[ab][:]
          matmul(weight + g * abp, 1, lv.P, lv.P, lv.A * lv.B, w.o, nv, width, out);
          if (lv.renorm) {
            T* drow = div + (lv.divisors + g) * n + c0;
            for (int64_t v = 0; v < nv; ++v) {
              V peak = V{} + std::numeric_limits<T>::min();  // the max-abs, at least tiny
              for (int64_t p = 0; p < lv.P; ++p) {
                V x = load(out + p * width + v * L);
                V ax = x < 0 ? -x : x;
                peak = peak < ax ? ax : peak;
                peak = x != x ? x : peak;  // NaN stays visible (the range check then fails)
              }
              T lanes[L];
              store(lanes, peak);
              divide(out + v * L, lv.P, width, peak);
              const int64_t valid = std::min<int64_t>(L, cols - v * L);
              for (int64_t q = 0; q < valid; ++q) drow[v * L + q] = lanes[q];
            }
          } else if (square && k == K - 1) {
            T* drow = div + square_row * n + c0;
            for (int64_t c = 0; c < cols; ++c) {
              T s = 0;
              for (int64_t p = 0; p < lv.P; ++p) s += out[p * width + c] * out[p * width + c];
              drow[c] = s;
            }
          }
          give(out, lv.P, width, cols, Child<T>{dst.ptr + g * dst.sn, 0, dst.sr, 1}, c0, false);
        }
      }
    }
  };
  // as direction_logits: 1 / ||v|| from the checked squared norms, or (every level
  // renormalised, max-abs 1) min(1 / ||v||, 1); then (v * inverse) * exp(s)
  auto run_head = [&](int64_t, int64_t cbegin, int64_t cend) {
    if (!head) return;
    const T* root = outs.back().data_ptr<T>();
    T* lg = logits.data_ptr<T>();
    T* inv = inverse.data_ptr<T>();
    for (int64_t c = cbegin; c < cend; ++c) {
      T i;
      if (square) {
        i = T(1) / std::sqrt(div[square_row * n + c]);
      } else {
        T sq = 0;
        for (int64_t p = 0; p < classes; ++p) sq += root[p * n + c] * root[p * n + c];
        i = std::min(T(1) / std::sqrt(sq), T(1));
      }
      inv[c] = i;
      for (int64_t p = 0; p < classes; ++p) lg[c * classes + p] = (root[p * n + c] * i) * scale;
    }
  };
  run_split<T>(plan, split, false, width, 0, levels, run_head);
  // whether every divisor lies within [lowest, highest] (false for NaN too)
  const bool in_range = all_within(div, divisors.numel(), T(lowest), T(highest));
  return {outs, divisors, in_range, logits, inverse};
}

template <typename T>
std::vector<at::Tensor> backward_impl(const std::vector<at::Tensor>& blocks, Plan plan,
                                      const at::Tensor& grad_in, const std::vector<bool>& needs,
                                      const std::vector<at::Tensor>& outs,
                                      const at::Tensor& divisors, const at::Tensor& inverse,
                                      double log_scale) {
  constexpr int64_t L = Vec<T>::lanes;
  const int64_t n = plan.n, K = plan.levels.size(), nb = plan.blocks;
  // which slots' gradients are needed: the blocks' as asked, a level's if anything below it is
  std::vector<bool> need(needs.begin(), needs.end());
  need.resize(nb + K, false);
  for (int64_t k = 0; k < K; ++k) {
    Level& lv = plan.levels[k];
    for (int64_t i = lv.first; i < lv.first + lv.nodes && !(plan.linear && k == 0); ++i)
      lv.need_children = lv.need_children || need[plan.slot[0][i]] || need[plan.slot[1][i]];
    need[nb + k] = need[lv.w] || lv.need_children;
  }
  const auto options = grad_in.options();
  // with the head, grad_in is the logits' (n, C) gradient: the root's comes first
  const bool head = inverse.defined();
  const int64_t classes = plan.levels.back().P;
  const T scale = std::exp(static_cast<T>(log_scale));
  std::vector<at::Tensor> grads(nb), level_grads(K);
  for (int64_t s = 0; s < nb; ++s)  // zeros: several levels may read one block
    if (need[s] && blocks[s].dim() == 3) grads[s] = at::zeros(blocks[s].sizes(), options);
  for (int64_t k = 0; k + 1 < K; ++k)
    if (need[nb + k]) level_grads[k] = at::empty(outs[k].sizes(), options);
  level_grads[K - 1] = head ? at::empty({1, classes, n}, options) : grad_in;
  const std::vector<Child<T>> gslots = as_slots<T>(grads, level_grads);
  const std::vector<Child<T>> slots = as_slots<T>(blocks, outs);
  // the weights' gradients: each weight block at its offset in a zeroed buffer per task
  std::vector<int64_t> offset(nb, -1);
  int64_t total = 0;
  for (const auto& lv : plan.levels)
    if (need[lv.w] && offset[lv.w] < 0)
      offset[lv.w] = std::exchange(total, total + blocks[lv.w].numel());
  const T* div = divisors.data_ptr<T>();
  const int64_t width = chunk_registers(plan.max_ab) * L;
  const int64_t pad_p = padded_width<T>(plan.max_p);
  const Split split = split_work<T>(plan);
  at::Tensor g_weights =
      at::zeros({split.subtrees ? 1 : split.tasks, std::max<int64_t>(total, 1)}, options);
  std::vector<T> dots(split.tasks, T(0));

  // d = v / ||v||: dL/dv = exp(s) (g - d (g . d)) / ||v||, dL/ds = exp(s) sum g . d; dots[t]:
  // the sum of g . d over columns cbegin..cend
  auto run_head = [&](int64_t t, int64_t cbegin, int64_t cend) {
    if (!head) return;
    const T* root = outs.back().data_ptr<T>();
    const T* inv = inverse.data_ptr<T>();
    const T* g = grad_in.data_ptr<T>();
    const int64_t gs0 = grad_in.stride(0), gs1 = grad_in.stride(1);
    T* gv = level_grads[K - 1].data_ptr<T>();
    for (int64_t c = cbegin; c < cend; ++c) {
      T dot = 0;
      for (int64_t p = 0; p < classes; ++p)
        dot += g[c * gs0 + p * gs1] * (root[p * n + c] * inv[c]);
      dots[t] += dot;
      const T factor = inv[c] * scale;
      for (int64_t p = 0; p < classes; ++p)
        gv[p * n + c] = (g[c * gs0 + p * gs1] - (root[p * n + c] * inv[c]) * dot) * factor;
    }
  };
  // levels k1-1 down to k0, weight gradients added into task t's buffer
  auto levels = [&](int64_t t, int64_t k0, int64_t k1, int64_t cbegin, int64_t cend, Work<T>& w) {
    T* gw_all = g_weights.data_ptr<T>() + (split.subtrees ? 0 : t) * g_weights.size(1);
    for (int64_t k = k1 - 1; k >= k0; --k) {
      const Level& lv = plan.levels[k];
      if (!need[nb + k]) continue;
      const bool need_w = need[lv.w];
      const T* weight = blocks[lv.w].data_ptr<T>();
      const Child<T> gsrc = gslots[nb + k];
      const int64_t ab = lv.A * lv.B, abp = ab * lv.P;
      const int64_t ldg = padded_width<T>(lv.P);
      const auto [g0, g1] = task_nodes(plan, split, t, k);
      for (int64_t g = g0; g < g1; ++g) {
        const auto ch = children<T>(plan, lv, g, slots);
        const auto gch = children<T>(plan, lv, g, gslots);
        T* gw = need_w ? gw_all + offset[lv.w] + g * abp : nullptr;
        for (int64_t c0 = cbegin; c0 < cend; c0 += width) {
          const int64_t cols = std::min(width, cend - c0);
          const int64_t nv = padded_width<T>(cols) / L;
          // G[p][:] = grad / divisor, zero past the columns
          const T* grow = gsrc.ptr + g * gsrc.sn + c0 * gsrc.sc;
          load_rows(grow, gsrc.sr, gsrc.sc, lv.P, cols, width, w.p);
          if (lv.renorm) {  // the divisors padded with ones, then whole registers
            const T* drow = div + (lv.divisors + g) * n + c0;
            for (int64_t c = 0; c < width; ++c) w.dv[c] = c < cols ? drow[c] : T(1);
            for (int64_t v = 0; v < nv; ++v) divide(w.p + v * L, lv.P, width, load(w.dv + v * L));
          }
          load_children(plan, k, lv, ch, c0, cols, width, w.child);
          if (need_w) {
            // G transposed, (cols, ldg): lanes P..ldg are left as they are (the products
            // below compute them, but only lanes below P are kept)
            for (int64_t c = 0; c < cols; ++c) {
              T* row = w.gt + c * ldg;
              for (int64_t p = 0; p < lv.P; ++p) row[p] = w.p[p * width + c];
            }
            // g_W[(a, b)][p] = sum_c (left (x) right)[(a, b)][c] G[c][p]
            outer(w.child[0], lv.A, w.child[1], lv.B, nv, width, w.o);
            gram<T, true>(w.o, ab, width, w.gt, ldg, cols, gw, lv.P);
          }
          if (!lv.need_children) continue;
          // gO[ab][:] = sum_p W[ab][p] G[p][:]
          matmul(weight + g * abp, lv.P, 1, ab, lv.P, w.p, nv, width, w.go);
          // a level's result feeds one parent (written); a block may feed several (added)
          for (int s = 0; s < 2; ++s) {
            const int64_t slot = plan.slot[s][lv.first + g];
            if (!need[slot]) continue;
            child_grad(w.go, lv.A, lv.B, s, w.child[1 - s], nv, width, w.grad);
            give(w.grad, lv.rows(s), width, cols, gch[s], c0, slot < nb);
          }
        }
      }
    }
  };
  run_split<T>(plan, split, true, width, pad_p, levels, run_head);
  at::Tensor summed = g_weights.size(0) > 1 ? g_weights.sum(0) : g_weights[0];
  for (int64_t s = 0; s < nb; ++s)
    if (offset[s] >= 0)
      grads[s] = summed.narrow(0, offset[s], blocks[s].numel()).view(blocks[s].sizes());
  const T dot = std::accumulate(dots.begin(), dots.end(), T(0));
  if (head) grads.push_back(at::scalar_tensor(dot * scale, options));
  return grads;
}

using Lists = std::vector<std::vector<int64_t>>;

// `lists`: the weights' slots, then the left and right children's slots and rows, one entry
// per node. Returns (level results, divisors (R, 1, n), whether every divisor lies within
// [lowest, highest], logits (n, C), 1 / ||root|| (n)); the last two undefined (None) without
// `head` (log_scale s).
Forward tree_forward(std::vector<at::Tensor> blocks, Lists lists, std::vector<bool> renorm,
                     bool linear, bool square, c10::optional<double> log_scale, double lowest,
                     double highest) {
  const Plan plan = make_plan(blocks, std::move(lists), renorm, linear);
  return AT_DISPATCH_FLOATING_TYPES(blocks[0].scalar_type(), "tree_forward", [&] {
    return forward_impl<scalar_t>(blocks, plan, square, log_scale.has_value(),
                                  log_scale.value_or(0.0), lowest, highest);
  });
}

// The blocks' gradients (undefined where not needed), then with the head (`inverse`) the
// log-scale's; `grad` is the root's (1, C, n) gradient, or with the head the logits' (n, C).
std::vector<at::Tensor> tree_backward(std::vector<at::Tensor> blocks, at::Tensor grad,
                                      std::vector<bool> needs, Lists lists,
                                      std::vector<bool> renorm, bool linear,
                                      std::vector<at::Tensor> outs, at::Tensor divisors,
                                      c10::optional<at::Tensor> inverse,
                                      c10::optional<double> log_scale) {
  const Plan plan = make_plan(blocks, std::move(lists), renorm, linear);
  TORCH_CHECK((int64_t)needs.size() == plan.blocks, "tree_levels: one need per block");
  // (autograd gives the gradient its output's shape and dtype)
  if (!inverse.has_value()) grad = grad.contiguous();
  return AT_DISPATCH_FLOATING_TYPES(blocks[0].scalar_type(), "tree_backward", [&] {
    return backward_impl<scalar_t>(blocks, plan, grad, needs, outs, divisors.contiguous(),
                                   inverse.value_or(at::Tensor()), log_scale.value_or(0.0));
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("tree_forward", &tree_forward, "the levels of a binary tree, forward");
  module.def("tree_backward", &tree_backward, "the levels of a binary tree, backward");
}
