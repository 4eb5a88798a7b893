# The Synapse SDK's ToTask plugin template (shared/seeds/to-task-action-reference.txt), verbatim but
# for its first line: `from synapse_sdk.plugins.actions.to_task import ToTaskAction` became this.
from totask_ray import ToTask as ToTaskAction


class ToTask(ToTaskAction):
    action_name = "to_task"

    def convert_data_from_file(
        self, primary_file_url, primary_file_name, data_file_url, data_file_name, task_data=None
    ):
        # TODO: Parse data_file_url and return task data payload.
        return {}

    def convert_data_from_inference(self, inference_data, task_data=None):
        # TODO: Convert inference output to task data payload.
        return inference_data
