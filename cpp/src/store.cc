#include "rapidlimit/store.h"

namespace rapidlimit {

std::string_view StrategyName(Strategy s) {
  switch (s) {
    case Strategy::kFixedWindow:
      return "fixed-window";
    case Strategy::kMovingWindow:
      return "moving-window";
    case Strategy::kSlidingWindowCounter:
      return "sliding-window-counter";
    case Strategy::kTokenBucket:
      return "token-bucket";
  }
  return "unknown";
}

std::optional<Strategy> StrategyFromName(std::string_view name) {
  for (Strategy s : kStrategies) {
    if (StrategyName(s) == name) return s;
  }
  return std::nullopt;
}

}  // namespace rapidlimit
