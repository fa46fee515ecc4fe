// A persistent pool of worker threads for the CPU kernels (internal header). Starting std::threads per
// call costs tens of microseconds, as much as a whole 4096×4096 GEMV, so workers stay alive, spin
// briefly after each job (back-to-back calls, as in a decoder, then start without a sleep/wake round
// trip) and block on a condition variable when idle.
#pragma once

#include <cstdint>

namespace nuq::cpu::detail {

// Task body: runs task `task` as participant `worker` (0 = the calling thread, < participants). The
// worker index lets callers hand each participant its own scratch memory; which tasks a participant
// runs varies from call to call, so results must not depend on it.
using TaskFn = void (*)(void* context, int64_t task, int worker);

// Runs fn(context, t, worker) for every t in [0, tasks) on at most `threads` threads (the caller
// included) and returns when all are done. Tasks must not throw. When the pool is already busy (a
// concurrent or nested call) the tasks run on the calling thread alone, which gives the same results.
// Returns the number of participants used (<= threads), so callers can size scratch beforehand with
// max_participants().
void parallel_for(int64_t tasks, int threads, TaskFn fn, void* context);

// Participants parallel_for(tasks, threads, ...) may use.
int max_participants(int64_t tasks, int threads);

// The thread count `requested` stands for (0 = hardware threads).
int resolve_threads(int requested);

}  // namespace nuq::cpu::detail
