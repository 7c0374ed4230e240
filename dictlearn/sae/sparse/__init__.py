"""The sparse paths every SAE architecture takes.

The dense encoder product `x @ W_enc` ([B, d] x [d, n]) is the only cost of an
SAE step that must touch every latent. Everything after it follows only the
selected latents: the forward keeps the selected pre-activations, and the
backward of the encoder and both passes of the decoder gather and scatter
rows of the weights at the selected indices. Every path is exact: results
equal the dense formulation's (ties included), and a selection that cannot
hold a batch says so, so that the caller computes that batch densely.

    tuning      KernelTuning: every size that chooses between exact paths
    rank        exact top-k of rows (two masked stages), merging top lists,
                the k-th largest by bisection, a score near a rank
    rows        row gathers and scatter-adds at selected entries, in loops
    decode      sparse_decode (custom VJP), count_fired, densify
    spec        EncoderSpec, EncoderOutput, Candidates, preactivations, and
                batch_sum / broadcast_rows (sums over the batch as products)
    per_token   the encoder matmul over tiles and blocks, selecting per token
    capacity    every positive entry as flat triples, up to a capacity
    batch       BatchTopK: from candidates, from a capacity selection, exhaustive
    encode      encode_select (custom VJP), encoder_grads, attach_encoder_vjp
    fused       topk_mse: TopK's whole reconstruction term and its gradient,
                one pass per tile of rows; batch_mse: the same for triples
                selected beforehand (BatchTopK)

Module dependencies point down this list.
"""
from dictlearn.sae.sparse.batch import Kept
from dictlearn.sae.sparse.batch import batch_top
from dictlearn.sae.sparse.batch import candidate_floor
from dictlearn.sae.sparse.capacity import Selection
from dictlearn.sae.sparse.capacity import select_positive
from dictlearn.sae.sparse.decode import count_fired
from dictlearn.sae.sparse.decode import densify
from dictlearn.sae.sparse.decode import sparse_decode
from dictlearn.sae.sparse.encode import attach_encoder_vjp
from dictlearn.sae.sparse.encode import encode_select
from dictlearn.sae.sparse.encode import encoder_grads
from dictlearn.sae.sparse.encode import with_encoder_vjp
from dictlearn.sae.sparse.fused import TopKTerm
from dictlearn.sae.sparse.fused import batch_mse
from dictlearn.sae.sparse.fused import topk_mse
from dictlearn.sae.sparse.rank import score_near_rank
from dictlearn.sae.sparse.rank import top_k_rows
from dictlearn.sae.sparse.spec import AuxSelection
from dictlearn.sae.sparse.spec import EncoderOutput
from dictlearn.sae.sparse.spec import EncoderSpec
from dictlearn.sae.sparse.spec import batch_sum
from dictlearn.sae.sparse.spec import broadcast_rows
from dictlearn.sae.sparse.spec import check_block_size
from dictlearn.sae.sparse.spec import no_aux_selection
from dictlearn.sae.sparse.spec import preactivations
from dictlearn.sae.sparse.tuning import DEFAULT_TUNING
from dictlearn.sae.sparse.tuning import KernelTuning

__all__ = [
    'AuxSelection', 'DEFAULT_TUNING', 'EncoderOutput', 'EncoderSpec', 'Kept', 'KernelTuning',
    'Selection', 'TopKTerm', 'attach_encoder_vjp', 'batch_mse', 'batch_sum', 'batch_top',
    'broadcast_rows', 'candidate_floor', 'check_block_size', 'count_fired', 'densify',
    'encode_select', 'encoder_grads', 'no_aux_selection', 'preactivations', 'score_near_rank',
    'select_positive', 'sparse_decode', 'top_k_rows', 'topk_mse', 'with_encoder_vjp',
]
