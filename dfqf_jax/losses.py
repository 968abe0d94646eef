"""DFQF losses. Every function is a batch-level scalar; logits are [N, classes]."""
import jax
import jax.numpy as jnp
from flax import traverse_util

VARIANCE_FLOOR = 1e-8


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy with integer labels."""
  log_p = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(log_p, labels[:, None], axis=-1).mean()


def kd_loss(teacher_logits, student_logits):
  """KL(softmax(t) || softmax(s)) = sum_c p_t (log p_t - log p_s), averaged over the batch."""
  log_p_t = jax.nn.log_softmax(teacher_logits)
  log_p_s = jax.nn.log_softmax(student_logits)
  return (jnp.exp(log_p_t) * (log_p_t - log_p_s)).sum(-1).mean()


def entropy(p, axis=-1):
  """Shannon entropy in nats, with 0 log 0 = 0."""
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)


def inception_score_loss(teacher_logits, lambda_is: float):
  """L_IS = H(y|x) - lambda_is * H(y).

  H(y|x): mean over images of the entropy of softmax(t_i) (confident images);
  H(y): entropy of the batch-mean distribution mean_i softmax(t_i) (all classes).
  Returns (loss, conditional_entropy, marginal_entropy).
  """
  p = jax.nn.softmax(teacher_logits)
  conditional = entropy(p).mean()
  marginal = entropy(p.mean(0))
  return conditional - lambda_is * marginal, conditional, marginal


def bn_statistics_loss(input_stats, batch_stats):
  """L_BN = sum over BN layers of mean_c [ s2 - rv * log(s2) + (mu - rm)^2 ].

  input_stats: the `bn_input_stats` collection sown by `models.layers.BatchNorm`
  (batch mean `mean` and unbiased batch variance `var` at each BN's input);
  batch_stats: the same network's running statistics (`mean`, `var`).
  A variance of exactly 0 is replaced by 1e-8 (as the reference code does).
  """
  stats = traverse_util.flatten_dict(input_stats)
  running = traverse_util.flatten_dict(batch_stats)
  total = 0.0
  for path, running_mean in running.items():
    if path[-1] != "mean":
      continue
    layer = path[:-1]
    (mu,) = stats[layer + ("mean",)]
    (s2,) = stats[layer + ("var",)]
    running_var = running[layer + ("var",)]
    s2 = jnp.where(s2 == 0, VARIANCE_FLOOR, s2)
    total = total + jnp.mean(s2 - running_var * jnp.log(s2) + jnp.square(mu - running_mean))
  return total


def top1_correct(logits, labels):
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
