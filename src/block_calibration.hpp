// Internal: `nuq calibrate --by-block` (CalibrateOptions::by_block), the model run one decoder block at a
// time over every calibration token, for models larger than memory. model_tasks.cpp loads and checks;
// this runs the blocks, keeps the work resumable and writes the outputs.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "nuq/llama.hpp"
#include "nuq/model_tasks.hpp"

namespace nuq::detail {

// Bytes of one block's XᵀX statistics in F32: the four distinct inputs (q/k/v, o, gate/up, down), each a
// [cols, cols] matrix and its diagonal.
uint64_t hessian_bytes_per_block(const LlamaConfig& c);
// The whole model's: every block's, and the classifier's input (the final normed hidden states).
uint64_t hessian_bytes(const LlamaConfig& c);

struct BlockProgress {
  // Before the first block: the bytes the run will write into `where` at most, and the bytes free there.
  std::function<void(uint64_t need, uint64_t available, const std::string& where)> plan;
  // After each block this run computes: its index, the model's blocks, the block this run started at
  // (earlier ones were done by an interrupted run) and the block's seconds.
  std::function<void(int64_t block, int64_t blocks, int64_t first, double seconds)> block;
};

// Runs `ids` (windows of o.ctx tokens, BOS first, as the one-pass run cuts them) block by block and writes
// o.out and, with o.hessian, a directory of per-block XᵀX shards with an index, holding the same values
// as the one-pass files. Work in progress lives in `<o.out>.blocks/` (hidden states after the last
// finished block, each finished block's statistics); a run with the same inputs continues after the last
// finished block. Fills r.layers, r.windows and the Hessian counts.
void calibrate_blocks(LlamaModel& model, int32_t bos, const std::vector<int32_t>& ids, const CalibrateOptions& o,
                      const BlockProgress& progress, CalibrateResult& r);

}  // namespace nuq::detail
