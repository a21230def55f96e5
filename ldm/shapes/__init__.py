"""The default model's world: procedurally rendered captioned scenes of coloured shapes
(`scenes`), their prompt grammar (`prompts`), a classical shape detector (`detect`), the
prompt-adherence evaluation (`adherence`, `ldm eval`) and the scene layout planner (`layout`,
registered as the "scenes" layout planner). The SD core never imports this package."""
