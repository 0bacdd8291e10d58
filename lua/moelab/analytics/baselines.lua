--- Random-routing baselines: what each router metric would be, in
-- expectation, if every token picked k distinct experts uniformly at random
-- out of E (and, for the per-token metrics, if the router's probabilities
-- were uniform). A measured metric means something only next to its
-- baseline: a MaxVio of 0.3 over 512 tokens is what chance gives, over a
-- million tokens it is a badly skewed router.
--
-- Notation: N tokens, E experts, k experts per token, A = N k assignments;
-- c_e = tokens routed to expert e (c_e ~ Binomial(N, k/E) marginally, and
-- sum_e c_e = A exactly, so the c_e are equicorrelated with correlation
-- -1/(E - 1)); mu = A / E the mean count, sigma^2 = N (k/E)(1 - k/E) its
-- variance. Every function is pure and deterministic (simulations use a
-- fixed-seed generator) and caches nothing the caller can see.
local B = {}

local function check_nek(fname, n, e, k)
  if type(n) ~= "number" or n < 0 or n ~= math.floor(n) then
    error(string.format("%s: tokens must be a non-negative integer, got %s", fname, tostring(n)), 3)
  end
  if type(e) ~= "number" or e < 1 or e ~= math.floor(e) then
    error(string.format("%s: num_experts must be a positive integer, got %s", fname, tostring(e)), 3)
  end
  if type(k) ~= "number" or k <= 0 or k > e then
    error(string.format("%s: experts_per_token must be in (0, num_experts = %s], got %s", fname, tostring(e),
      tostring(k)), 3)
  end
end

--- Expected population variance of the load fractions f_e = c_e / A:
-- E[(1/E) sum_e (f_e - 1/E)^2] = Var(c_e) / A^2 = (1 - k/E) / (N k E). Exact.
function B.load_variance(n, e, k)
  check_nek("baselines.load_variance", n, e, k)
  if n == 0 then return 0 end
  return (1 - k / e) / (n * k * e)
end

--- Coefficient of variation of the counts (population std / mean), as the
-- root of its exact expected square: sqrt(E[CV^2]) = sqrt((E - k) / (N k)).
-- (By Jensen this is a slight upper bound on E[CV]; the gap vanishes as N grows.)
function B.cv(n, e, k)
  check_nek("baselines.cv", n, e, k)
  if n == 0 then return 0 end
  return math.sqrt((e - k) / (n * k))
end

--- Expected number of experts that receive no token: E (1 - k/E)^N. Exact.
function B.dead_experts(n, e, k)
  check_nek("baselines.dead_experts", n, e, k)
  return e * (1 - k / e) ^ n
end

--- Mean per-token router entropy of a uniform router: log E (nats).
function B.router_entropy(e) return math.log(e) end

--- Mean top-1 probability of a uniform router: 1 / E.
function B.top1_prob(e) return 1 / e end

--- z (mean squared logsumexp of the logits) of a router whose logits are all
-- zero, i.e. uniform at zero scale: (log E)^2. A router with uniform scores
-- has z >= this only through a common logit offset, which the z-loss removes.
function B.z(e) return math.log(e) ^ 2 end

--- Share of a token's k choices that repeat at the next token (top-k), and the
-- probability that the top-1 expert repeats, for two independent random
-- choices: the expected overlap of two random k-subsets is k^2/E, so k/E and 1/E.
function B.consecutive(e, k) return {topk = k / e, top1 = 1 / e} end

--- Co-activation N(Ei, Ej) / N(Ei) (i ~= j): given expert i is among a
-- token's k, each other expert is among the remaining k - 1 of E - 1: (k-1)/(E-1).
function B.co_activation(e, k)
  if e <= 1 then return 0 end
  return (k - 1) / (e - 1)
end

--- Share of a domain's (or a string's) tokens routed to one expert: k/E.
function B.specialization(e, k) return k / e end

--- Share of top-k (top-1) choices two unrelated routers agree on: k/E (1/E).
function B.saturation(e, k) return {topk = k / e, top1 = 1 / e} end

-- ---------------------------------------------------------------- normals --

-- E[max of m iid standard normals], by numerical integration of
-- x * m * phi(x) * Phi(x)^(m-1) on a fine grid, Phi by cumulative trapezoids.
local max_normal_cache = {}
function B.expected_max_normal(m)
  if max_normal_cache[m] then return max_normal_cache[m] end
  local lo, hi, h = -9, 9, 1e-3
  local steps = math.floor((hi - lo) / h + 0.5)
  local c = 1 / math.sqrt(2 * math.pi)
  local cdf, acc = 0, 0
  local prev_pdf = c * math.exp(-lo * lo / 2)
  local prev_f = 0
  for i = 1, steps do
    local x = lo + i * h
    local pdf = c * math.exp(-x * x / 2)
    cdf = math.min(1, cdf + (prev_pdf + pdf) * h / 2)
    local f = x * m * pdf * cdf ^ (m - 1)
    acc = acc + (prev_f + f) * h / 2
    prev_pdf, prev_f = pdf, f
  end
  max_normal_cache[m] = acc
  return acc
end

-- --------------------------------------------------------- simulation --

-- A fixed-seed Lehmer ("minimal standard") generator: x <- 48271 x mod (2^31 - 1);
-- exact in doubles. Good enough for baselines, and independent of math.random.
local function lehmer(seed)
  local x = seed % 2147483646 + 1
  return function()
    x = (48271 * x) % 2147483647
    return (x - 1) / 2147483646
  end
end

--- Monte-Carlo estimate, over `trials` random routings of n tokens (each k
-- distinct uniform experts, by a partial Fisher-Yates shuffle), of the mean
-- MaxVio, normalised usage entropy and dead-expert count. Deterministic (seed).
function B.simulate(n, e, k, trials, seed)
  check_nek("baselines.simulate", n, e, k)
  trials = trials or 200
  local rand = lehmer(seed or 12345)
  local perm, counts = {}, {}
  for i = 1, e do perm[i] = i end
  local kk = math.floor(k)
  local mv, ent, dead = 0, 0, 0
  local loge = math.log(e)
  for _ = 1, trials do
    for i = 1, e do counts[i] = 0 end
    for _ = 1, n do
      for r = 1, kk do
        local j = r + math.floor(rand() * (e - r + 1))
        if j > e then j = e end
        perm[r], perm[j] = perm[j], perm[r]
        counts[perm[r]] = counts[perm[r]] + 1
      end
    end
    local total, mx, h, d = n * kk, 0, 0, 0
    for i = 1, e do
      local c = counts[i]
      if c > mx then mx = c end
      if c == 0 then d = d + 1 else h = h - (c / total) * math.log(c / total) end
    end
    mv = mv + (total > 0 and mx / (total / e) - 1 or 0)
    ent = ent + (e > 1 and total > 0 and h / loge or 1)
    dead = dead + d
  end
  return {max_vio = mv / trials, usage_entropy = ent / trials, dead_experts = dead / trials}
end

-- Below this mean count per expert (A / E) the normal approximations are
-- replaced by simulation.
B.SIMULATE_BELOW = 30

local sim_cache = {}
local function simulated(n, e, k)
  local key = n .. ":" .. e .. ":" .. k
  if not sim_cache[key] then
    -- about two million draws, at least 200 and at most 5000 trials
    local trials = math.max(200, math.min(5000, math.floor(2e6 / math.max(1, n * k))))
    sim_cache[key] = B.simulate(n, e, k, trials, 12345)
  end
  return sim_cache[key]
end

--- Expected MaxVio = max_e c_e / mu - 1.
-- For a mean count mu >= 30: the counts are close to equicorrelated normals
-- (correlation -1/(E-1)), which are X_e - mean(X) for iid normals X_e of
-- variance sigma^2 / (1 - 1/E); so E[max c] - mu = sigma m_E / sqrt(1 - 1/E),
-- m_E the expected maximum of E standard normals (numerical integration), and
--   E[MaxVio] ~= sqrt((E - k) / (N k)) * m_E / sqrt(1 - 1/E).
-- Below that: a simulation (200 to 5000 trials, about 2 million draws) with a fixed seed.
function B.max_vio(n, e, k)
  check_nek("baselines.max_vio", n, e, k)
  if n == 0 or e == 1 then return 0 end
  if n * k / e < B.SIMULATE_BELOW and k == math.floor(k) then return simulated(n, e, k).max_vio end
  return math.sqrt((e - k) / (n * k)) * B.expected_max_normal(e) / math.sqrt(1 - 1 / e)
end

--- Expected normalised usage entropy H(f) / log E of the load distribution.
-- For mu >= 30, second order around uniform: H ~= log E - (E/2) sum (f_e - 1/E)^2,
-- whose expectation gives 1 - (E - k) / (2 N k log E). Below that: simulation.
function B.usage_entropy(n, e, k)
  check_nek("baselines.usage_entropy", n, e, k)
  if e == 1 then return 1 end
  if n == 0 then return 0 end
  if n * k / e < B.SIMULATE_BELOW and k == math.floor(k) then return simulated(n, e, k).usage_entropy end
  return math.max(0, 1 - (e - k) / (2 * n * k * math.log(e)))
end

--- Expected drop rate with capacity C = ceil(cf k N / E) per expert and
-- random routing: E * E[(c - C)+] / (N k) with c ~ Binomial(N, k/E), the
-- expectation summed exactly over the binomial tail (log-space pmf).
-- 0 without a capacity (cf <= 0).
function B.drop_rate(n, e, k, capacity_factor)
  check_nek("baselines.drop_rate", n, e, k)
  if not capacity_factor or capacity_factor <= 0 or n == 0 then return 0 end
  local cap = math.ceil(capacity_factor * k * n / e - 1e-9)
  local p = k / e
  if p >= 1 then return math.max(0, n - cap) / n end
  -- pmf(x) = C(n, x) p^x (1-p)^(n-x), computed from the mode outwards
  local lp, lq = math.log(p), math.log(1 - p)
  local function lgamma_int(m)   -- log(m!) by summation is too slow for big n; Stirling-series
    if m < 2 then return 0 end
    local x = m + 1
    return (x - 0.5) * math.log(x) - x + 0.5 * math.log(2 * math.pi) + 1 / (12 * x) - 1 / (360 * x ^ 3)
      + 1 / (1260 * x ^ 5)
  end
  local function logpmf(x) return lgamma_int(n) - lgamma_int(x) - lgamma_int(n - x) + x * lp + (n - x) * lq end
  local excess = 0
  local x = cap + 1
  local lv = x <= n and logpmf(x) or -math.huge
  while x <= n do
    local pm = math.exp(lv)
    excess = excess + (x - cap) * pm
    if pm < 1e-16 and x > n * p then break end
    -- pmf(x+1) / pmf(x) = (n - x) / (x + 1) * p / (1 - p)
    lv = lv + math.log((n - x) / (x + 1)) + lp - lq
    x = x + 1
  end
  return e * excess / (n * k)
end

return B
