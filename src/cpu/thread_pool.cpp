#include "thread_pool.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define NUQ_CPU_RELAX() _mm_pause()
#else
#define NUQ_CPU_RELAX() std::this_thread::yield()
#endif

namespace nuq::cpu::detail {
namespace {

// Requests beyond this many threads are clamped (a typo like threads=100000 must not spawn them).
constexpr int kMaxThreads = 256;
// Pause iterations a worker spins on the job counter before sleeping (tens of microseconds): long
// enough to catch the next layer's call in a decode loop, short enough not to steal a shared core.
constexpr int kSpinIterations = 4000;

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(int64_t tasks, int participants, TaskFn fn, void* context) {
    std::unique_lock<std::mutex> busy(dispatch_, std::try_to_lock);
    if (!busy.owns_lock() || participants <= 1) {
      for (int64_t t = 0; t < tasks; ++t) fn(context, t, 0);
      return;
    }
    grow(participants - 1);
    uint64_t job;
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = fn;
      context_ = context;
      tasks_ = tasks;
      helpers_ = participants - 1;
      next_.store(0, std::memory_order_relaxed);
      job = generation_.load(std::memory_order_relaxed) + 1;
      open_.store(job, std::memory_order_seq_cst);
      generation_.store(job, std::memory_order_release);
    }
    cv_.notify_all();
    work(0);
    // Close the job, then wait only for helpers that joined it. A helper that has not been scheduled
    // yet (another process holds its core) would otherwise delay every call by a scheduler tick; the
    // caller has already run the tasks it left. open_ and active_ are seq_cst so that a helper either
    // sees the job closed or is seen active.
    open_.store(0, std::memory_order_seq_cst);
    for (int spin = 0; active_.load(std::memory_order_seq_cst) != 0; ++spin) {
      if (spin < kSpinIterations) {
        NUQ_CPU_RELAX();
      } else {
        std::unique_lock<std::mutex> lock(mu_);
        done_cv_.wait(lock, [&] { return active_.load(std::memory_order_seq_cst) == 0; });
      }
    }
  }

 private:
  void work(int worker) {
    for (;;) {
      const int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
      if (t >= tasks_) break;
      fn_(context_, t, worker);
    }
  }

  void grow(int helpers) {
    while (int(workers_.size()) < helpers) {
      const int index = int(workers_.size()) + 1;
      // The generation before the job about to be published: a thread that starts late must still
      // see that job as new.
      const uint64_t seen = generation_.load(std::memory_order_acquire);
      workers_.emplace_back([this, index, seen] { loop(index, seen); });
    }
  }

  void loop(int index, uint64_t seen) {
    for (;;) {
      uint64_t now = generation_.load(std::memory_order_acquire);
      for (int spin = 0; now == seen && spin < kSpinIterations; ++spin) {
        NUQ_CPU_RELAX();
        now = generation_.load(std::memory_order_acquire);
      }
      if (now == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || generation_.load(std::memory_order_acquire) != seen; });
        if (stop_) return;
        now = generation_.load(std::memory_order_acquire);
      }
      seen = now;
      int helpers;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stop_) return;
        helpers = helpers_;
      }
      // Workers beyond this job's thread count sit it out, so `threads` is honoured exactly.
      if (index > helpers) continue;
      active_.fetch_add(1, std::memory_order_seq_cst);
      if (open_.load(std::memory_order_seq_cst) == now) work(index);
      if (active_.fetch_sub(1, std::memory_order_seq_cst) == 1) {
        std::lock_guard<std::mutex> lock(mu_);
        done_cv_.notify_all();
      }
    }
  }

  std::mutex dispatch_;  // one job at a time
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_{0};
  std::atomic<uint64_t> open_{0};  // generation of the job helpers may still join, 0 when closed
  std::atomic<int> active_{0};     // helpers inside a job
  TaskFn fn_ = nullptr;
  void* context_ = nullptr;
  int64_t tasks_ = 0;
  int helpers_ = 0;
  bool stop_ = false;
};

Pool& pool() {
  static Pool instance;
  return instance;
}

}  // namespace

int resolve_threads(int requested) {
  int n = requested > 0 ? requested : int(std::thread::hardware_concurrency());
  return std::clamp(n, 1, kMaxThreads);
}

int max_participants(int64_t tasks, int threads) {
  return int(std::max<int64_t>(1, std::min<int64_t>(tasks, resolve_threads(threads))));
}

void parallel_for(int64_t tasks, int threads, TaskFn fn, void* context) {
  if (tasks <= 0) return;
  pool().run(tasks, max_participants(tasks, threads), fn, context);
}

}  // namespace nuq::cpu::detail
