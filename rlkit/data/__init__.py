"""The data layer: what a run trains and evaluates on, as token ids. Synthetic arithmetic tasks and the problem
types (rlkit.data.tasks), reading local files and hub datasets in TRL's formats (rlkit.data.sources), rendering
prompts and answers through chat templates (rlkit.data.chat), and preparing a run's data (rlkit.data.prepare).

Imports: rlkit.recipe, and the leaves rlkit.rewards and rlkit.envs (answer formats, tool traces); never training,
runtime, algorithms or orchestration.
"""
