"""The fixed prose of docs/results.md (slm_cli/report/results.py writes the page): the setup, what
each part measures, the limits of the test and how to rerun it. `LIMITS` takes the run's tokens,
passes and corpus size."""

SETUP = """- **Corpus**: WikiText-2 (the vendored validation split, 290k training tokens after a seeded 5% of
  its lines is held out; 4096-token BPE), 128-token windows, 16 windows per step. Validation loss is on
  the held-out lines, 10 times per run.
- **Sizes**: A = `gpt2-nano` (4 layers, 4 heads, d = 128), B = the same with d = 256 (4× the
  non-embedding parameters). AdamW, warmup 20 steps, cosine decay to the run's last step.
- **Methods** at keep 0.6 (ESLM α = 0.4; random and RHO-1 ratio 0.6); Ada-ESLM from α = 0.5 with its
  adaptive rule; ESLM-KD is ESLM at α = 0.4 with `target=kd` (top 64 teacher probabilities, weight 0.5).
  The teacher is size B trained with CLM for twice the steps: a larger teacher for size A, the same size
  trained longer for size B.
- **CLM at fewer steps** (0.4, 0.6 and 0.8 of them, each with its own full schedule) gives CLM's loss
  at other budgets: a method is compared with CLM interpolated at its own nominal and at its realised
  FLOPs (linear in log FLOPs, never extrapolated; `slm report`'s "against CLM" table).
- **Hierarchical ESLM** (size A) keeps half of each micro-batch's windows by an early exit after the
  first block (64 of the 128 positions scored), then ESLM at α = 0.4 inside them.
- **Warm starts**: ESLM (loss and entropy) trains with CLM for the first quarter of the steps
  (`trainer.selection_start_step`), then selects; its FLOPs count CLM's cost for those steps.
- **Training length**: size A's comparison again at 400 and 1600 steps (2 seeds each), each run
  with its own warmup and cosine schedule, against CLM trained as long.
- **Downstream**: every final model of the main comparisons on slm's offline tasks (`slm eval
  tasks=slm_local`: the last word of 300 WikiText-2 test passages, and the next line of 300
  Shakespeare speeches among 4), accuracy with its spread over seeds.
- **Seeds**: 3 per configuration at 200 steps (the keep sweep: 1), 2 at the longer lengths. Runs go
  two at a time, one thread each, on an otherwise idle machine: tokens/s and seconds are per run with
  another beside it."""

PAYS_OFF = """Each setting (size A at each training length, size B) in the currencies a user pays: the
validation loss against CLM's at the same realised FLOPs (what slm executes; CLM interpolated between
its shorter runs, judged beyond 2 standard errors), and the training time (seconds inside training
steps, two runs side by side on 2 cores) the method's mean curve takes to reach CLM's final loss,
as a share of CLM's own. A method pays off in a setting where it is better at the same realised FLOPs
or reaches CLM's loss in less time. CLM's budgets are its runs at every length of the size (each with
its own schedule), so at the longest length a method that saves FLOPs meets CLM between its two
longest runs."""

PART1 = """Nominal FLOPs are the papers' accounting (the backward pass counted for the selected tokens
only); realised FLOPs are what slm executes (the trunk's backward stays dense; docs/flops.md).
"saved" is relative to CLM on the same tokens."""

KEEP_SWEEP = """Validation loss after the full steps at each keep (the share of tokens trained on): where
each method does best. The keep-0.6 column is the 3-seed main run."""

PART2 = """The training mixture: 50% clean WikiText-2, 30% the same text with the words of each line in a
random order (the words of the language without the language), 20% Tiny Shakespeare (another domain).
The reference is size A trained with CLM on WikiText-2's test split, clean text that no run trains
or validates on; `slm score` scores the mixture with it, and RHO-1 keeps the 60% of each batch with
the highest excess loss. "val loss wiki" is the loss on held-out clean WikiText-2 lines, the target
domain; "val loss" averages all three sources. The reference's cost (its training and the scoring
pass) is not in the FLOPs."""

PART3 = """CoCoNTs (n = 4, r = 8, weight 0.5) trains every token towards a mixture of its label and the
stored 4-gram next-token distribution. "Steps to CLM's loss" is the first step at which its mean
validation curve reaches CLM's final loss (linear between the 10 validation points)."""

PART4 = """Per configuration: the share of tokens trained on, ESLM's α (constant) or Ada-ESLM's (mean over the
run; final; the step from which it stays at its final value, mean over seeds), and the training
throughput (two runs side by side on 2 cores). Why Ada-ESLM's α settles on its floor:
[methods.md](methods.md#ada-eslm-adaptive-confidence)."""

LIMITS = """- **Scale.** The default sizes have 0.8M and 3M non-embedding parameters, and each run sees
  {tokens} training tokens, {passes:.1f} passes over a corpus of {corpus}. The papers' claims are about GPT-2-size models and billions of
  tokens; a method that needs a trained model to pick tokens well (ESLM scores with the model being
  trained) may behave differently when the model is this weak for this long. A verdict here is a
  verdict at this scale.
- **Repetition.** With more than one pass over the corpus, a token trained on in one pass comes back
  in the next: selection then partly decides *when* a token is learned, not only *whether*.
- **Noise.** Three seeds give the spread of the mean to within a factor of about two; differences
  below twice their standard error are reported as no difference, not as equality.
- **Our choices.** Ada-ESLM's rule and ESLM-KD's loss are slm's readings of the paper (the rule is
  not published; docs/methods.md). The ESLM-KD teacher is small (size B, twice the steps). The
  RHO-1 noise is synthetic (shuffled words) plus another domain, and the reference learns from
  one small split of clean text (WikiText-2's test split).
- **Cost.** Realised FLOPs are what slm executes on a CPU-shaped implementation: the trunk's
  backward pass stays dense, so selection saves less than its nominal FLOPs (docs/flops.md), and
  wall-clock saves less again (docs/benchmarks.md)."""

SCALE = """ESLM reports its gains on GPT-2 pretraining; RHO-1 on 1.1B and 7B models. slm's `*_gpt2`
experiments are the GPT-2 124M recipe on OpenWebText (nanoGPT's 600k steps of 491,520 tokens).
`slm train +experiment=<name> dry_run=true` gives their FLOPs from slm's own accounting and their
time on one GPU at 40% MFU (divide by the GPU count for a node). Selection runs per micro-batch, so
no scoring pass is paid; realised FLOPs are what the code executes (the trunk's backward stays dense
under token selection; hierarchical ESLM also skips the dropped windows' trunk). RHO-1's reference
training and scoring, and ESLM-KD's teacher, come on top."""

SCALE_AFTER = """One seed of one method is the GPU-days above, about a day or more on an 8-GPU node; the
comparison above (six methods × 3 seeds, CLM at four budgets, two sizes) is two orders of magnitude
more. A first test at scale would be
CLM, ESLM and random at one seed on GPT-2 124M with a 10B-token budget (about 1/30 of the full
recipe)."""

RERUN = """```bash
make install
SLM=.venv/bin/slm scripts/reproduce_small.sh            # hours on 2 cores (the top of this page); writes docs/results.md
```

The script skips every run that already has its summary, so an interrupted run continues where it
stopped. Everything scales through its settings and overrides: sizes (`SIZE_A`, `SIZE_B`), corpus
(`DATA`), batch (`BATCH`), length (`STEPS`), seeds (`SEEDS`), keeps (`KEEPS`, `KEEP`, `RATIO`), and
any `slm train` override after the options, e.g. `trainer=ddp` or `hydra/launcher=slurm`
(`scripts/reproduce_small.sh -h`)."""
