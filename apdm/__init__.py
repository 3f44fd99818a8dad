"""apdm: protect people against unauthorized personalization of text-to-image diffusion models.

Two protection engines and one shared core:

* ``apdm.protect_model``  — a provider fine-tunes a protected checkpoint (APDM: DPO loss + Learning-to-Protect);
* ``apdm.protect_images`` — a user perturbs photos so personalization on them fails (LDU + pixel baselines);
* ``apdm.evaluate``/``apdm.evaluation`` — personalization simulator, robustness attacks, metrics, report.

The shared math lives in ``apdm.core`` and the attacker's simulator in ``apdm.personalization``.
"""

__version__ = "0.1.0"
