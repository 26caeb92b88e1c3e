"""The client of an OpenAI-compatible LLM, shared by the data generator and the eval judge.

JAX-free and free of model code: it imports only `alpaca_jax.errors`, `alpaca_jax.configlib`,
`alpaca_jax.jsonl` and the `openai` client, so `data_gen` (which must not load model code) and
`alpaca_jax.eval` both build on it without reaching into each other.

- client.py: `Teacher` (bounded concurrency, retries, error classification), `Request`, `Response`
- journal.py: the fsync'ed, append-only record of every paid-for response
- budget.py: request/token/cost accounting and caps
- config.py: `TeacherConfig`, `RequestSampling`, `BudgetConfig`, `ModelPrice`
- rouge.py: ROUGE-L with rouge-score semantics (dedup of generated tasks, eval of answers)
"""
