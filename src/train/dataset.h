/* Token datasets for training: one contiguous token array (8-, 16- or 32-bit
 * ids, in memory or memory-mapped read-only from a file), optionally with
 * document boundaries and a domain label per document.
 *
 * A dataset is a view [begin, end) over shared, refcounted token storage, so
 * a held-out split costs nothing. Positions and window numbers are 0-based,
 * relative to the view.
 *
 * Sampling is stateless: a batch is a pure function of (seed, epoch, step),
 * so the data position (epoch, step) is the sampler's whole state and any
 * batch can be regenerated bit for bit on resume. */
#ifndef MOE_DATASET_H
#define MOE_DATASET_H

#include <stdint.h>

#include "../core/status.h"

typedef struct moe_dataset moe_dataset;

/* Byte-level: each byte is a token id 0..255, vocabulary 256. */
#define MOE_BYTE_VOCAB 256

/* Copies n bytes of text. */
moe_dataset *moe_dataset_from_bytes(const void *text, int64_t n);
/* The built-in synthetic corpus (corpus.h): exactly one of num_docs and
 * num_bytes is > 0. Carries documents and their domains. */
moe_dataset *moe_dataset_from_corpus(uint64_t seed, int64_t num_docs, int64_t num_bytes);
/* A text file, byte-level, memory-mapped. */
moe_dataset *moe_dataset_from_text_file(const char *path);
/* A pre-tokenized file of raw little-endian ids, `width` 2 (uint16) or 4
 * (uint32) bytes each, memory-mapped read-only. vocab_size 0 infers max+1;
 * otherwise every id must be below it. The file must not change while mapped. */
moe_dataset *moe_dataset_from_token_file(const char *path, int width, int64_t vocab_size);
void moe_dataset_free(moe_dataset *ds);

int64_t moe_dataset_num_tokens(const moe_dataset *ds);
int64_t moe_dataset_vocab_size(const moe_dataset *ds);
int moe_dataset_token_width(const moe_dataset *ds);          /* bytes per stored id: 1, 2 or 4 */
int moe_dataset_is_byte_level(const moe_dataset *ds);        /* made from text: ids are bytes */
/* Documents that overlap the view; 0 when the source has no boundaries. */
int64_t moe_dataset_num_documents(const moe_dataset *ds);
int moe_dataset_num_domains(const moe_dataset *ds);
const char *moe_dataset_domain_name(const moe_dataset *ds, int domain);
/* Domain id of the token at pos, -1 when unknown. */
int moe_dataset_domain_at(const moe_dataset *ds, int64_t pos);

/* Tokens [i, j) as int64 ids / as bytes (byte-level datasets only). */
moe_status moe_dataset_tokens(const moe_dataset *ds, int64_t i, int64_t j, int64_t *out);
moe_status moe_dataset_bytes(const moe_dataset *ds, int64_t i, int64_t j, char *out);

/* Splits into a training part and a held-out tail holding about `fraction`
 * of the tokens (0 < fraction < 1). With two or more documents the cut is at
 * the document boundary nearest that point (each side keeps at least one
 * document); otherwise at a token position (each side keeps at least one
 * token). Both parts share the storage; ds stays valid. */
moe_status moe_dataset_split(const moe_dataset *ds, double fraction, moe_dataset **train, moe_dataset **heldout);

/* Random windows: row r of batch (seed, epoch, step) starts at a uniform
 * position in [0, n - seq_len - 1], drawn from Philox counter
 * (step << 24 | r) under a key of (seed, epoch); ids[r] = tokens
 * [s, s + seq_len), targets[r] = tokens [s + 1, s + seq_len + 1).
 * The outputs are row-major [batch_size, seq_len]; domains (may be NULL)
 * gets each input token's domain id, -1 when unknown. */
moe_status moe_dataset_batch(const moe_dataset *ds, uint64_t seed, uint64_t epoch, uint64_t step,
                             int64_t batch_size, int64_t seq_len,
                             int64_t *ids, int64_t *targets, int64_t *domains);

/* Non-overlapping windows for evaluation over a whole split: window w has
 * inputs [w * seq_len, (w + 1) * seq_len) and targets one further. */
int64_t moe_dataset_num_windows(const moe_dataset *ds, int64_t seq_len);
/* Windows first .. first + count - 1 of the order for (seed, epoch): the
 * natural order when shuffle is 0, else a Fisher-Yates permutation drawn from
 * the counter RNG (cached in ds for the last (seq_len, seed, epoch), so
 * walking an epoch costs one shuffle). Requires first + count <= the number
 * of windows. Outputs as moe_dataset_batch with `count` rows. */
moe_status moe_dataset_window_batch(moe_dataset *ds, int64_t seq_len, int64_t first, int64_t count,
                                    int shuffle, uint64_t seed, uint64_t epoch,
                                    int64_t *ids, int64_t *targets, int64_t *domains);

#endif
