"""Concept vectors, projection readouts and persona space, from activations at one site.

A concept vector is the mean activation over texts about a concept minus the mean
over a baseline set (Anthropic's emotion-concept work: stories about each emotion,
the baseline the mean over all emotions' stories), optionally with the top
principal components of neutral text projected out, so that what every text
shares (topic-free variance, position, style) does not pass for the concept:

    acts = activations.read_activations(model, activations.encode_texts(tok, texts), [site])
    vectors = concept_vectors({'happy': happy_acts, 'sad': sad_acts}, skip=1,
                              neutral=neutral_subspace(neutral_acts, variance=0.5))
    readout(model, 'What a lovely day!', vectors['happy'], site)   # projection per token

Means are of per-text means (each text weighs the same whatever its length), over
the positions from `skip` on (1 leaves out BOS, whose activation is an outlier).

Persona space (the Assistant-Axis paper): a persona's vector is the mean
activation over the model's replies, in character, to a few questions (system
prompt = the persona); the principal components of the persona vectors span
persona space, the leading one is the persona axis, oriented so that the default
assistant (the template's own system prompt) projects high on it.
"""
import dataclasses
import logging
from typing import Mapping, Optional, Sequence

import numpy as np

from dictlearn.analysis import activations
from dictlearn.analysis import texts as texts_lib
from dictlearn.analysis import vectors_io

log = logging.getLogger(__name__)


# ---- means and principal components ------------------------------------------------


def mean_activation(acts: Sequence[np.ndarray], *, skip: int = 0) -> np.ndarray:
  """Mean over texts of each text's mean activation over positions `skip` on.

  Raises:
    ValueError: no texts, or a text with no position at or after `skip`.
  """
  if acts is None or len(acts) == 0:
    raise ValueError('mean_activation: the text set is empty; expected at least one text.')
  means = []
  for i, a in enumerate(acts):
    if a.ndim != 2 or a.shape[0] <= skip:
      raise ValueError(f'mean_activation: text {i} has activations of shape {a.shape}; expected '
                       f'(positions > {skip}, d_model).')
    means.append(np.asarray(a[skip:], np.float64).mean(axis=0))
  return np.mean(means, axis=0)


@dataclasses.dataclass(frozen=True)
class PCA:
  """Principal components of a set of rows.

  Attributes:
    mean: (d,) the mean that was subtracted.
    components: (k, d) orthonormal, by decreasing variance.
    explained_variance_ratio: (k,) each component's share of the total variance.
  """
  mean: np.ndarray
  components: np.ndarray
  explained_variance_ratio: np.ndarray

  def project(self, x: np.ndarray) -> np.ndarray:
    """Coordinates of rows (or one row) in the components, after centring."""
    return (np.asarray(x, np.float64) - self.mean) @ self.components.T


def principal_components(x: np.ndarray, n_components: Optional[int] = None) -> PCA:
  """PCA of rows `x` (n, d) by SVD; `n_components` None keeps min(n, d).

  Raises:
    ValueError: fewer than two rows, or not a 2-D array.
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f'principal_components: expected (n >= 2, d) rows, got shape {x.shape}.')
  mean = x.mean(axis=0)
  _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
  var = s ** 2
  ratio = var / max(var.sum(), np.finfo(np.float64).tiny)
  k = len(s) if n_components is None else min(n_components, len(s))
  return PCA(mean, vt[:k], ratio[:k])


def neutral_subspace(acts: Sequence[np.ndarray], *, variance: float = 0.5,
                     skip: int = 0) -> np.ndarray:
  """The top principal components of neutral text that explain `variance` of its variance.

  Args:
    acts: activations of neutral texts, one (positions, d) array each.
    variance: fraction of the token-level variance to cover (0 < variance <= 1).
    skip: leading positions of each text left out (1: BOS).

  Returns:
    (k, d) orthonormal rows: the fewest components whose ratios sum to `variance`.
  """
  if not 0 < variance <= 1:
    raise ValueError(f'variance must be in (0, 1], got {variance}.')
  if acts is None or len(acts) == 0:
    raise ValueError('neutral_subspace: the neutral text set is empty; expected at least one.')
  rows = np.concatenate([np.asarray(a[skip:]) for a in acts])
  pca = principal_components(rows)
  k = int(np.searchsorted(np.cumsum(pca.explained_variance_ratio), variance - 1e-12)) + 1
  log.info('neutral subspace: %d components explain %.3f of the variance', k,
           pca.explained_variance_ratio[:k].sum())
  return pca.components[:k]


def project_out(v: np.ndarray, basis: Optional[np.ndarray]) -> np.ndarray:
  """`v` (or rows of v) minus its projection on the span of orthonormal rows `basis`."""
  if basis is None or len(basis) == 0:
    return np.asarray(v)
  return v - (v @ basis.T) @ basis


# ---- concept vectors ---------------------------------------------------------------


def concept_vectors(concept_acts: Mapping[str, Sequence[np.ndarray]],
                    baseline_acts: Optional[Sequence[np.ndarray]] = None, *,
                    neutral: Optional[np.ndarray] = None, skip: int = 0) -> dict[str, np.ndarray]:
  """Mean activation of each concept's texts minus the baseline mean, neutral PCs removed.

  Args:
    concept_acts: {concept: activations of its texts}.
    baseline_acts: activations of baseline texts; None = every concept's texts
      (the mean of the concepts' means, as the emotion paper does).
    neutral: (k, d) orthonormal directions to project out (`neutral_subspace`).
    skip: leading positions of each text left out (1: BOS).

  Returns:
    {concept: float32 (d,) vector}.

  Raises:
    ValueError: no concepts, an empty text set (named), or one concept without a
      baseline.
  """
  if not concept_acts:
    raise ValueError('concept_vectors: no concepts given; expected {concept: activations}.')
  means = {}
  for name, acts in concept_acts.items():
    if acts is None or len(acts) == 0:
      raise ValueError(f'concept_vectors: the text set of {name!r} is empty; expected at least '
                       'one text.')
    means[name] = mean_activation(acts, skip=skip)
  if baseline_acts is None:
    if len(means) < 2:
      raise ValueError('concept_vectors: one concept and no baseline texts; give baseline_acts '
                       'or several concepts (their mean is the baseline).')
    baseline = np.mean(list(means.values()), axis=0)
  else:
    baseline = mean_activation(baseline_acts, skip=skip)
  return {name: project_out(m - baseline, neutral).astype(np.float32)
          for name, m in means.items()}


def projections(acts: np.ndarray, vector: np.ndarray) -> np.ndarray:
  """Projection of each row of `acts` on the unit direction of `vector`.

  Raises:
    ValueError: widths differ, or a zero vector.
  """
  vector = np.asarray(vector, np.float64)
  if acts.shape[-1] != vector.shape[-1]:
    raise ValueError(f'A vector of width {vector.shape[-1]} against activations of width '
                     f'{acts.shape[-1]}; expected the same width (the site\'s d_model).')
  norm = np.linalg.norm(vector)
  if norm == 0:
    raise ValueError('The vector is zero; a projection needs a direction.')
  return (np.asarray(acts, np.float64) @ (vector / norm)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Readout:
  """A text read token by token along one direction.

  Attributes:
    tokens: the token strings (BOS first when the text was read after it).
    values: float32 (n,) the projection of each token's activation on the unit vector.
  """
  tokens: list
  values: np.ndarray

  def format(self, width: int = 8) -> str:
    """One `token  value` line per token."""
    return '\n'.join(f'{t!r:>{width + 2}}  {v:+9.3f}' for t, v in zip(self.tokens, self.values))


def load_vector(path: str, name: str, cfg, model_path: Optional[str] = None
                ) -> tuple[np.ndarray, str]:
  """One named vector of a vector file (`vectors_io`) and its site, checked against the model.

  Args:
    path: the vector file.
    name: the vector's name in it.
    cfg: the model at hand; the file must have been made with it.
    model_path: the model's file, whose SHA-256 is compared when the file has one.

  Raises:
    ValueError: vectors from another model or of another width, or no vector
      `name` (the message lists the file's names).
  """
  saved = vectors_io.load_vectors(path, vectors_io.model_identity(cfg, model_path))
  if name not in saved.vectors:
    raise ValueError(f'{path} has no vector {name!r}; it holds {sorted(saved.vectors)}.')
  return saved.vectors[name], saved.site


def readout(model, text: str, vector: np.ndarray, site: str, *, bos: bool = True) -> Readout:
  """Projection of each token's activation at `site` on the unit direction of `vector`.

  Raises:
    ValueError: an unknown site, an empty text, or a vector whose width is not the
      model's d_model.
  """
  cfg, _, tokenizer = model
  vector = np.asarray(vector)
  if vector.shape != (cfg.d_model,):
    raise ValueError(f'A vector of shape {vector.shape} for {cfg.name or "the model"}; expected '
                     f'({cfg.d_model},), the width of {site}.')
  ids = activations.encode_texts(tokenizer, [text], bos=bos)[0]
  acts = activations.read_activations(model, [ids], [site])[site][0]
  return Readout([tokenizer.decode([i]) for i in ids], projections(acts, vector))


# ---- persona space ------------------------------------------------------------------


def persona_chats(system_prompt: Optional[str], questions: Sequence[str]) -> list[list[dict]]:
  """One chat per question under a system prompt (None: the template's default one)."""
  head = [] if system_prompt is None else [{'role': 'system', 'content': system_prompt}]
  return [head + [{'role': 'user', 'content': q}] for q in questions]


def persona_activations(model, personas: Mapping[str, Optional[str]], questions: Sequence[str],
                        site: str, sampling: texts_lib.Sampling, *, model_path: str,
                        cache_dir: str = '', batch_size: int = 8
                        ) -> tuple[dict[str, list[np.ndarray]], dict[str, list[str]]]:
  """The model's replies in each persona, and their activations at `site`.

  Every persona answers every question (replies generated once and cached, see
  `dictlearn.analysis.texts`); each reply is read in its chat, and only its own
  tokens' activations are kept.

  Args:
    model: (cfg, params, tokenizer) loaded from `model_path`.
    personas: {name: system prompt}; None = the default assistant (the chat
      template's own system prompt).
    questions: user messages every persona answers.
    site: the hook site read.
    sampling: generation settings of the replies.
    model_path: the model file (it names the cache).
    cache_dir: cache directory; '' = `dictlearn.cache.cache_dir()`.
    batch_size: sequences per forward pass.

  Returns:
    ({name: one (reply tokens, d) array per question}, {name: the replies}).

  Raises:
    ValueError: no personas or no questions.
  """
  if not personas:
    raise ValueError('persona_activations: no personas; expected {name: system prompt}.')
  activations.check_texts(questions, 'questions')
  names = list(personas)
  chats = [c for name in names for c in persona_chats(personas[name], questions)]
  replies = texts_lib.model_replies(model, chats, sampling, model_path=model_path,
                                    cache_dir=cache_dir)
  # An empty reply (eos first) carries no activation; it is left out, not an error.
  kept = [i for i, r in enumerate(replies) if r.strip()]
  tokens, starts = activations.encode_replies(model[2], [chats[i] for i in kept],
                                              [replies[i] for i in kept])
  acts = activations.read_activations(model, tokens, [site], batch_size=batch_size)[site]
  by_name = {name: [] for name in names}
  for i, a, start in zip(kept, acts, starts):
    by_name[names[i // len(questions)]].append(a[start:])
  for name, rows in by_name.items():
    if not rows:
      raise ValueError(f'Persona {name!r}: every reply is empty; expected at least one reply '
                       'with text (raise max_new_tokens or change the questions).')
  n = len(questions)
  return by_name, {name: replies[j * n:(j + 1) * n] for j, name in enumerate(names)}


@dataclasses.dataclass(frozen=True)
class PersonaSpace:
  """Persona vectors, their principal components and the persona axis.

  Attributes:
    names: the personas, in order.
    vectors: (n, d) each persona's mean activation.
    pca: principal components of `vectors`.
    axis: (d,) unit leading component, signed so that the assistant projects
      above the personas' mean.
    projections: (n,) each persona's projection on `axis`, relative to the mean.
    assistant_projection: the default assistant's projection on `axis`, relative
      to the personas' mean.
    contrast_cosine: cosine of `axis` with (assistant - mean persona), the
      paper's other definition of the assistant axis.
  """
  names: list
  vectors: np.ndarray
  pca: PCA
  axis: np.ndarray
  projections: np.ndarray
  assistant_projection: float
  contrast_cosine: float

  def assistant_rank(self) -> int:
    """How many personas project above the assistant (0: the assistant is the extreme)."""
    return int(np.sum(self.projections > self.assistant_projection))


def persona_space(persona_vectors: Mapping[str, np.ndarray], assistant: np.ndarray) -> PersonaSpace:
  """PCA of persona vectors; the leading axis oriented toward the default assistant.

  Args:
    persona_vectors: {name: (d,) mean activation}, at least three personas.
    assistant: (d,) the default assistant's mean activation (not in the PCA).

  Raises:
    ValueError: fewer than three personas, or vectors of different widths.
  """
  names = list(persona_vectors)
  if len(names) < 3:
    raise ValueError(f'persona_space needs at least three personas, got {len(names)} ({names}).')
  vectors = np.stack([np.asarray(persona_vectors[n], np.float64) for n in names])
  assistant = np.asarray(assistant, np.float64)
  if assistant.shape != vectors.shape[1:]:
    raise ValueError(f'The assistant vector has shape {assistant.shape}; expected '
                     f'{vectors.shape[1:]} like the persona vectors.')
  pca = principal_components(vectors)
  axis = pca.components[0]
  if (assistant - pca.mean) @ axis < 0:
    axis = -axis
  contrast = assistant - pca.mean
  cosine = float(contrast @ axis / max(np.linalg.norm(contrast), np.finfo(np.float64).tiny))
  return PersonaSpace(names, vectors, pca, axis, (vectors - pca.mean) @ axis,
                      float((assistant - pca.mean) @ axis), cosine)
