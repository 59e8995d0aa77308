// Intel AMX's bf16 tile products, for the kernels that multiply on tiles where the CPU has them
// (paged attention's scores and P @ V, attention_tile.h; the panels' matmul, panel_linear_cpu.cpp).
// One configuration serves all: eight tiles of 16 rows of 64 bytes, 0-3 the products (2 A blocks
// x 2 B blocks of fp32), 4-5 A, 6-7 B (bf16). A tile product multiplies bf16 pairs exactly and
// adds them in fp32; inputs and results below fp32's normal range are flushed to zero.
#pragma once

#include "bf16_dots.h"

#if defined(TRELLIS_BF16_DOTS)
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>

namespace trellis {

constexpr int kTileRows = 16;  // rows of A or C, pairs of B per tile; 32 bf16 (64 bytes) per tile row

// A constant: GCC drops stores into a local configuration that only ldtilecfg reads.
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};
constexpr TileConfig product_tile_config() {
  TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = kTileRows;
  }
  return config;
}
inline constexpr TileConfig kProductTiles = product_tile_config();

__attribute__((target("amx-tile"))) inline void configure_product_tiles() { _tile_loadconfig(&kProductTiles); }

__attribute__((target("amx-tile"))) inline void release_tiles() { _tile_release(); }

// C[i][j] = sum_k A[i][k] B[k][j] (+ C when kAccumulate) for up to 32 x 32 of C (fp32, rows
// `ldc` apart): A's rows i in blocks of 16 at a0 and (kTwoA) a1, `lda` bf16 apart, `depth` of k
// (a multiple of 32); B as bf16 pairs b[k/2][j], rows `ldb` pairs apart, columns j in blocks of 16
// at b0 and (kTwoB) b1.
template <bool kTwoA, bool kTwoB, bool kAccumulate>
__attribute__((target("amx-tile,amx-bf16"))) inline void tile_product(const c10::BFloat16* a0,
                                                                       const c10::BFloat16* a1, int64_t lda,
                                                                       const uint32_t* b0, const uint32_t* b1, int64_t ldb,
                                                                       int64_t depth,
                                                                       float* c, int64_t ldc) {
  float* c_blocks[4] = {c, c + kTileRows, c + kTileRows * ldc, c + kTileRows * ldc + kTileRows};
  if constexpr (kAccumulate) {
    _tile_loadd(0, c_blocks[0], ldc * 4);
    if constexpr (kTwoB) _tile_loadd(1, c_blocks[1], ldc * 4);
    if constexpr (kTwoA) _tile_loadd(2, c_blocks[2], ldc * 4);
    if constexpr (kTwoA && kTwoB) _tile_loadd(3, c_blocks[3], ldc * 4);
  } else {
    _tile_zero(0);
    if constexpr (kTwoB) _tile_zero(1);
    if constexpr (kTwoA) _tile_zero(2);
    if constexpr (kTwoA && kTwoB) _tile_zero(3);
  }
  for (int64_t k = 0; k < depth; k += 32) {
    _tile_loadd(4, a0 + k, lda * 2);
    _tile_loadd(6, b0 + k / 2 * ldb, ldb * 4);
    if constexpr (kTwoB) _tile_loadd(7, b1 + k / 2 * ldb, ldb * 4);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kTwoB) _tile_dpbf16ps(1, 4, 7);
    if constexpr (kTwoA) {
      _tile_loadd(5, a1 + k, lda * 2);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (kTwoB) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c_blocks[0], ldc * 4);
  if constexpr (kTwoB) _tile_stored(1, c_blocks[1], ldc * 4);
  if constexpr (kTwoA) _tile_stored(2, c_blocks[2], ldc * 4);
  if constexpr (kTwoA && kTwoB) _tile_stored(3, c_blocks[3], ldc * 4);
}

// tile_product with its row and column blocks (one or two each) chosen at run time; the pointers
// of an unused block are ignored.
template <bool kAccumulate>
inline void tile_product_blocks(bool two_a, bool two_b, const c10::BFloat16* a0, const c10::BFloat16* a1,
                                int64_t lda, const uint32_t* b0, const uint32_t* b1, int64_t ldb, int64_t depth,
                                float* c, int64_t ldc) {
  if (two_a && two_b) return tile_product<true, true, kAccumulate>(a0, a1, lda, b0, b1, ldb, depth, c, ldc);
  if (two_a) return tile_product<true, false, kAccumulate>(a0, a1, lda, b0, b1, ldb, depth, c, ldc);
  if (two_b) return tile_product<false, true, kAccumulate>(a0, a1, lda, b0, b1, ldb, depth, c, ldc);
  return tile_product<false, false, kAccumulate>(a0, a1, lda, b0, b1, ldb, depth, c, ldc);
}

}  // namespace trellis
#endif
