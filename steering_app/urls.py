from django.urls import path

from steering_app import conversation_views, experiment_views, token_views, vector_views, views

urlpatterns = [
    path("", views.panel_page, name="steering-panel"),
    path("generate/", views.generate, name="steering-generate"),
    path("trainings/<int:training_id>/features/", views.feature_search, name="steering-feature-search"),
    path(
        "trainings/<int:training_id>/features/active/",
        views.prompt_features,
        name="steering-prompt-features",
    ),
    path(
        "trainings/<int:training_id>/features/<int:index>/card/",
        views.feature_card,
        name="steering-feature-card",
    ),
    path("trainings/<int:training_id>/scale/", views.training_scale, name="steering-training-scale"),
    path("trainings/<int:training_id>/max-tokens/", views.max_tokens_hint, name="steering-max-tokens-hint"),
    path("runs/", views.run_list, name="steering-runs"),
    path("runs/<int:pk>/", views.run_detail, name="steering-run"),
    path("runs/<int:pk>/cancel/", views.cancel_run, name="steering-run-cancel"),
    path("runs/<int:pk>/visibility/", views.run_visibility, name="steering-run-visibility"),
    path("runs/<int:pk>/delete/", views.delete_run, name="steering-run-delete"),
    path("conversations/", conversation_views.conversation_list, name="steering-conversations"),
    path("conversations/new/", conversation_views.new_conversation, name="steering-conversation-new"),
    path("conversations/<int:pk>/", conversation_views.conversation_detail, name="steering-conversation"),
    path("conversations/<int:pk>/send/", conversation_views.send_message, name="steering-conversation-send"),
    path(
        "conversations/<int:pk>/regenerate/",
        conversation_views.regenerate,
        name="steering-conversation-regenerate",
    ),
    path(
        "conversations/<int:pk>/visibility/",
        conversation_views.visibility,
        name="steering-conversation-visibility",
    ),
    path(
        "conversations/<int:pk>/delete/",
        conversation_views.delete_conversation,
        name="steering-conversation-delete",
    ),
    path(
        "conversations/<int:pk>/continue/",
        conversation_views.continue_from,
        name="steering-conversation-continue",
    ),
    path("experiments/", experiment_views.experiment_list, name="steering-experiments"),
    path("experiments/new/", experiment_views.new_experiment, name="steering-experiment-new"),
    path("experiments/<int:pk>/", experiment_views.experiment_detail, name="steering-experiment"),
    path(
        "experiments/<int:pk>/cancel/", experiment_views.cancel_experiment, name="steering-experiment-cancel"
    ),
    path(
        "experiments/<int:pk>/resume/", experiment_views.resume_experiment, name="steering-experiment-resume"
    ),
    path(
        "experiments/<int:pk>/delete/", experiment_views.delete_experiment, name="steering-experiment-delete"
    ),
    path("vectors/new/", vector_views.new_vector, name="steering-vector-new"),
    path("vectors/<int:pk>/", vector_views.vector_space, name="steering-vector-space"),
    path("control-vector/", vector_views.control_vector, name="steering-control-vector"),
    path("tokens/", token_views.api_tokens, name="api-tokens"),
    path("tokens/<int:pk>/revoke/", token_views.revoke_api_token, name="api-token-revoke"),
]
